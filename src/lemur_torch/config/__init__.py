"""The run's configuration: the schema (schema.py: enums, dataclasses, the ConfigStore entry), composition of
conf/ with the command line's overrides (compose.py: `load_config`) and validation before anything is built
(validate.py: `validate`). Every failure is a ConfigError (lemur_torch.errors) naming the key in one line.
"""

from lemur_torch.config.compose import composition_error, load_config
from lemur_torch.config.schema import (
    ActivationCheckpointing,
    AsyncMode,
    Attention,
    CheckpointConfig,
    ClusterConfig,
    CommitMode,
    Config,
    DataConfig,
    DeviceKind,
    ExportDtype,
    LogConfig,
    MixedPrecision,
    ModelConfig,
    OptimConfig,
    OptimImplementation,
    ParallelBackend,
    ParallelConfig,
    ReduceDtype,
    Schedule,
    SourceConfig,
    TrainConfig,
    ValidationConfig,
    WandbMode,
)
from lemur_torch.config.validate import check_values, validate

__all__ = [
    "ActivationCheckpointing",
    "AsyncMode",
    "Attention",
    "CheckpointConfig",
    "ClusterConfig",
    "CommitMode",
    "Config",
    "DataConfig",
    "DeviceKind",
    "ExportDtype",
    "LogConfig",
    "MixedPrecision",
    "ModelConfig",
    "OptimConfig",
    "OptimImplementation",
    "ParallelBackend",
    "ParallelConfig",
    "ReduceDtype",
    "Schedule",
    "SourceConfig",
    "TrainConfig",
    "ValidationConfig",
    "WandbMode",
    "check_values",
    "composition_error",
    "load_config",
    "validate",
]
