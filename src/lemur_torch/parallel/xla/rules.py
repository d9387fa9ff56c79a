"""The XLA backend's config rules, in one place, for the gate and the backend alike.

The gate (lemur_torch.parallel.check_config) runs `check_config` before any process group exists, on
machines with or without torch_xla. What depends on the pod itself (its devices and hosts) is known once the
runtime starts: the backend runs `check_mesh` then. The global batch is checked by both with the same rule
(lemur_torch.parallel.base.check_global_batch): by the gate over one host, by the backend over the pod's.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lemur_torch.errors import ConfigError
from lemur_torch.parallel import float8
from lemur_torch.parallel.base import check_global_batch
from lemur_torch.parallel.xla import attention, tpu


def precision(cfg: DictConfig, device_type: str) -> str:
    """bf16 (autocast over fp32 master weights) or fp32; `auto` is bf16 on TPU and fp32 elsewhere."""
    chosen = cfg.parallel.mixed_precision
    if chosen == "auto":
        return "bf16" if device_type == "TPU" else "fp32"
    return str(chosen)


def check_config(cfg: DictConfig, world_size: int) -> None:
    """The rules checkable before the runtime starts. `world_size` (launched processes) does not enter: the
    data-parallel size is the number of hosts, one process each, which only the runtime knows."""
    check_global_batch(cfg, 1, "hosts")
    if cfg.parallel.activation_checkpointing == "selective":
        raise ConfigError(
            "parallel.activation_checkpointing",
            "selective (op-level) is the FSDP backend's; xla_spmd rematerialises whole layers: use full, every_n "
            "or none",
        )
    float8.select(str(cfg.parallel.get("float8", "none")), "xla", backend="xla_spmd")  # refused unless none
    if cfg.optim.implementation in ("fused", "foreach"):
        raise ConfigError(
            "optim.implementation",
            f"{cfg.optim.implementation} AdamW cannot take its lr and step count on an XLA device (torch_xla has "
            "no fused kernel; capturable foreach refuses xla tensors): use auto (for_loop, capturable)",
        )
    if cfg.parallel.scan_layers and cfg.parallel.activation_checkpointing == "every_n":
        raise ConfigError(
            "parallel.activation_checkpointing",
            "every_n is not available with parallel.scan_layers (all layers run one program); use full or none",
        )
    attention.implementation_for(cfg.model.attention, tpu.runtime_device_type() or "a machine without torch_xla")


def check_mesh(cfg: DictConfig, devices: int, local_devices: int, hosts: int) -> None:
    """The rules of the pod the runtime found: `devices` in all, `local_devices` on each of `hosts` hosts."""
    tensor, rows = cfg.parallel.xla_tensor, cfg.train.micro_batch_size
    if tensor < 1 or devices % tensor:
        raise ConfigError("parallel.xla_tensor", f"{tensor} does not divide the {devices} devices")
    if rows % local_devices:
        raise ConfigError(
            "train.micro_batch_size",
            f"{rows} rows per host do not divide over the host's {local_devices} devices "
            f"(each device takes an equal share of its host's rows); use a multiple of {local_devices}",
        )
    check_global_batch(cfg, hosts, "hosts")
