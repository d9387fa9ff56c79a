"""Config schema (dataclasses registered in Hydra's ConfigStore), composition and validation.

The YAML tree in conf/ holds the values; these dataclasses hold the types. Composition rejects unknown keys
and wrong types; `validate` rejects impossible combinations. Both raise ConfigError, whose message is one
line naming the offending key, before any model is built.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import List, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lemur_torch.data.schema import DataConfig, SourceConfig  # noqa: F401  (re-exported)


class ConfigError(ValueError):
    """A config problem a user can fix; str() is one line naming the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


@dataclass
class ModelConfig:
    name: str = "tiny"
    # exact HF LlamaConfig fields
    vocab_size: int = 32000
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # HF folder (or hub id) to load weights from; null = random init with `train.seed`
    pretrained: Optional[str] = None
    # sdpa | eager | flash_attention_2 (CUDA + flash-attn only) | xla_flash (TPU only)
    attention: str = "sdpa"


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 10
    # cosine | constant
    schedule: str = "cosine"
    # final lr = min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    # steps over which the cosine decays; null = train.max_steps
    decay_steps: Optional[int] = None
    # fused/foreach AdamW kernels: auto picks fused on CUDA, foreach elsewhere
    implementation: str = "auto"


@dataclass
class ParallelConfig:
    # fsdp (FSDP2 over a DeviceMesh; also single process) | xla_spmd (torch_xla SPMD FSDPv2)
    backend: str = "fsdp"
    # HSDP: replicate groups x shard group; dp_shard=-1 means world_size / dp_replicate
    dp_replicate: int = 1
    dp_shard: int = -1
    # auto: bf16 params + fp32 reduce on accelerators, fp32 on CPU | bf16 | fp32
    mixed_precision: str = "auto"
    # none | full | every_n (checkpoint every `ac_every_n`-th decoder layer)
    activation_checkpointing: str = "none"
    ac_every_n: int = 2
    compile: bool = False
    reshard_after_forward: bool = True
    # xla_spmd: mesh is (fsdp, tensor); tensor axis size
    xla_tensor: int = 1
    # xla_spmd: run the decoder layers as one torch_xla scan (trace/compile time independent of depth)
    scan_layers: bool = False
    # xla_spmd: persistent compilation cache folder (per host); null = compile on every start
    xla_cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    seed: int = 1234
    seq_len: int = 256
    micro_batch_size: int = 4
    # tokens per optimizer step over all data-parallel ranks
    global_batch_tokens: int = 2048
    max_steps: int = 300
    grad_clip: float = 1.0
    # consecutive steps with a non-finite loss or grad norm before the run aborts
    max_nonfinite_steps: int = 5
    # sequence chunk for the fp32 cross-entropy (bounds the fp32 logits memory)
    loss_chunk: int = 1024
    # stop (with a checkpoint) after this step even though the schedule runs to max_steps: time-boxed
    # jobs, and resume tests; null = run to max_steps
    stop_at_step: Optional[int] = None
    # exit status after a preemption signal (SIGTERM/SIGUSR1) was honoured with a checkpoint
    preempt_exit_code: int = 124


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    every_steps: int = 100
    keep_last: int = 3
    # auto: resume from the newest complete checkpoint in `dir`; none: start fresh; or a checkpoint path
    resume: str = "auto"
    save_at_end: bool = True
    export_dir: Optional[str] = "${run_dir}/hf"
    export_at_end: bool = True
    max_shard_size_mb: int = 2000
    # float32 | bfloat16 | float16
    export_dtype: str = "float32"


@dataclass
class LogConfig:
    every_steps: int = 1
    console: bool = True
    # online | offline | disabled
    wandb_mode: str = "offline"
    wandb_project: str = "lemur-torch"
    wandb_dir: str = "${run_dir}"
    # auto: look the device up in metrics.PEAK_FLOPS; or a number (FLOP/s per device)
    peak_flops: str = "auto"


@dataclass
class Config:
    run_name: str = "smoke"
    run_dir: str = "outputs/${run_name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


ConfigStore.instance().store(name="lemur_schema", node=Config)


def _one_line(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(str(key), msg)


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides against the schema; errors are ConfigError."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lemur_torch.conf", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _one_line(exc) from None
    except Exception as exc:  # hydra's own override/missing-group errors
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        key = text.split("'")[1] if text.count("'") >= 2 else "overrides"
        raise ConfigError(key, text) from None
    return cfg


def flash_attention_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def xla_tpu_available() -> bool:
    if importlib.util.find_spec("torch_xla") is None:
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def validate(cfg: DictConfig, world_size: int) -> None:
    """Reject impossible combinations; called before any model is built."""
    t, p, m, o = cfg.train, cfg.parallel, cfg.model, cfg.optim
    if p.backend not in ("fsdp", "xla_spmd"):
        raise ConfigError("parallel.backend", f"unknown backend {p.backend!r}; use fsdp or xla_spmd")
    for key in ("seq_len", "micro_batch_size", "global_batch_tokens", "max_steps"):
        if t[key] <= 0:
            raise ConfigError(f"train.{key}", f"must be positive, got {t[key]}")
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError("train.seq_len", f"{t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    dp = data_parallel_size(cfg, world_size)
    per_micro = t.micro_batch_size * t.seq_len * dp
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            "train.global_batch_tokens",
            f"{t.global_batch_tokens} is not divisible by micro_batch_size x seq_len x data-parallel size "
            f"= {t.micro_batch_size} x {t.seq_len} x {dp} = {per_micro}",
        )
    if m.hidden_size % m.num_attention_heads or m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError("model.num_key_value_heads", "hidden_size must divide by heads, and heads by kv heads")
    if m.attention not in ("sdpa", "eager", "flash_attention_2", "xla_flash"):
        raise ConfigError("model.attention", f"unknown attention {m.attention!r}; use sdpa, eager, flash_attention_2 or xla_flash")
    if m.attention == "flash_attention_2" and not flash_attention_available():
        raise ConfigError(
            "model.attention",
            "flash_attention_2 needs a CUDA device and the flash-attn package (pip install '.[gpu]'); use sdpa here",
        )
    if m.attention == "xla_flash" and (p.backend != "xla_spmd" or not xla_tpu_available()):
        raise ConfigError("model.attention", "xla_flash (Pallas) runs only with parallel.backend=xla_spmd on a TPU")
    if p.activation_checkpointing not in ("none", "full", "every_n"):
        raise ConfigError("parallel.activation_checkpointing", "use none, full or every_n")
    if p.activation_checkpointing == "every_n" and p.ac_every_n < 1:
        raise ConfigError("parallel.ac_every_n", "must be >= 1")
    if p.mixed_precision not in ("auto", "bf16", "fp32"):
        raise ConfigError("parallel.mixed_precision", "use auto, bf16 or fp32")
    if o.schedule not in ("cosine", "constant"):
        raise ConfigError("optim.schedule", "use cosine or constant")
    if o.implementation not in ("auto", "fused", "foreach", "for_loop"):
        raise ConfigError("optim.implementation", "use auto, fused, foreach or for_loop")
    if len(o.betas) != 2:
        raise ConfigError("optim.betas", "needs exactly two values")
    if cfg.log.wandb_mode not in ("online", "offline", "disabled"):
        raise ConfigError("log.wandb_mode", "use online, offline or disabled")
    if cfg.checkpoint.export_dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError("checkpoint.export_dtype", "use float32, bfloat16 or float16")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError("checkpoint.keep_last", "must be >= 1")


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    p = cfg.parallel
    if p.backend == "xla_spmd":
        return 1  # one process per host feeds a global batch that SPMD shards over devices
    replicate = p.dp_replicate
    shard = world_size // replicate if p.dp_shard == -1 else p.dp_shard
    if replicate < 1 or shard < 1 or replicate * shard != world_size:
        raise ConfigError(
            "parallel.dp_shard",
            f"dp_replicate x dp_shard = {replicate} x {p.dp_shard} does not match world size {world_size}",
        )
    return world_size


def grad_accum_steps(cfg: DictConfig, dp_size: int) -> int:
    t = cfg.train
    return t.global_batch_tokens // (t.micro_batch_size * t.seq_len * dp_size)

