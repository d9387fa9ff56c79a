"""The FSDP backend's config rules, in one place, for the gate and the backend alike: the (replicate, shard)
mesh over the world size, the parameters' compute dtype (`parallel.mixed_precision`) and the gradients' reduce
dtype (`parallel.reduce_dtype`), the global batch over the data-parallel ranks, the optimizer
(`optim.implementation`), `model.attention` on this machine
(lemur_torch.attention, the CUDA kernels' seam) and `parallel.float8` on this machine's device
(lemur_torch.parallel.float8). Light: the gate runs `check_config` before any process group or model exists.
"""

from __future__ import annotations

from typing import Tuple

import torch
from omegaconf import DictConfig

from lemur_torch import attention
from lemur_torch.errors import ConfigError
from lemur_torch.parallel import float8
from lemur_torch.parallel.base import check_global_batch


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mesh_shape(cfg: DictConfig, world_size: int) -> Tuple[int, int]:
    """(dp_replicate, dp_shard) of the HSDP mesh; dp_shard=-1 means world_size / dp_replicate. Every rank is
    a data-parallel rank: the data-parallel size is the world size."""
    p = cfg.parallel
    replicate = p.dp_replicate
    shard = world_size // replicate if p.dp_shard == -1 else p.dp_shard
    if replicate < 1 or shard < 1 or replicate * shard != world_size:
        raise ConfigError(
            "parallel.dp_shard",
            f"dp_replicate x dp_shard = {replicate} x {p.dp_shard} does not match world size {world_size}",
        )
    return replicate, shard


def param_dtype(cfg: DictConfig, device_type: str) -> torch.dtype:
    """The dtype parameters compute in: bf16 (with fp32 master weights and reductions) or fp32; `auto` is bf16
    on CUDA and fp32 on the CPU."""
    precision = cfg.parallel.mixed_precision
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def reduce_dtype(cfg: DictConfig, device_type: str) -> torch.dtype:
    """The gradient reduce-scatter dtype: `parallel.reduce_dtype` under bf16 compute, fp32 otherwise."""
    if param_dtype(cfg, device_type) != torch.bfloat16:
        return torch.float32
    return torch.bfloat16 if cfg.parallel.reduce_dtype == "bf16" else torch.float32


def select_attention(cfg: DictConfig, device_type: str) -> attention.Selection:
    return attention.select(cfg.model.attention, device_type, param_dtype(cfg, device_type))


def float8_plan(cfg: DictConfig, device: torch.device) -> float8.Float8Plan:
    """`parallel.float8` on `device`: the CPU emulation there, float8 GEMMs on a CUDA GPU that has them (which
    take bf16 operands and write bf16: the run computes in bf16), a ConfigError naming the key and the device
    otherwise."""
    plan = float8.select_for_device(str(cfg.parallel.float8), device, "fsdp")
    if plan.enabled and not plan.emulate and param_dtype(cfg, device.type) != torch.bfloat16:
        raise ConfigError(
            float8.KEY,
            f"float8 {plan.recipe} on {plan.device} trains in bf16 (the float8 GEMMs write bf16), but "
            "parallel.mixed_precision is fp32: set parallel.mixed_precision=bf16 (or auto)",
        )
    return plan


def check_optimizer(cfg: DictConfig) -> None:
    """The non-finite guard skips a step inside the fused AdamW kernel (Backend.optimizer_step): the only AdamW
    of torch that takes the guard and its lr on the device."""
    if cfg.optim.implementation not in ("auto", "fused"):
        raise ConfigError(
            "optim.implementation",
            f"{cfg.optim.implementation} cannot skip a non-finite step on the device; the FSDP backend runs the "
            "fused AdamW (CPU and CUDA): use auto or fused",
        )


def check_config(cfg: DictConfig, world_size: int) -> None:
    """Every FSDP rule, for a run of `world_size` processes on this machine's device type."""
    mesh_shape(cfg, world_size)
    check_optimizer(cfg)
    check_global_batch(cfg, world_size)
    if cfg.parallel.reduce_dtype == "bf16" and param_dtype(cfg, device_type()) != torch.bfloat16:
        raise ConfigError(
            "parallel.reduce_dtype",
            "bf16 reduce-scatters bf16 gradients: it needs parallel.mixed_precision=bf16 (this run computes in fp32)",
        )
    select_attention(cfg, device_type())
    float8_plan(cfg, torch.device(device_type()))
