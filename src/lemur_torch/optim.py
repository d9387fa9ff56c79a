"""AdamW with Llama's parameter groups (no weight decay on norms and biases) and warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn


def build_optimizer(model: nn.Module, ocfg: DictConfig, device_type: str) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(param)
    impl = ocfg.implementation
    if impl == "auto":
        impl = "fused" if device_type == "cuda" else "foreach"
    groups = [{"params": decay, "weight_decay": ocfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps,
        fused=impl == "fused", foreach=impl == "foreach",
    )


def lr_lambda(step: int, ocfg: DictConfig, max_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr_ratio over decay_steps (default max_steps), then flat."""
    warmup = ocfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if ocfg.schedule == "constant":
        return 1.0
    total = ocfg.decay_steps or max_steps
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return ocfg.min_lr_ratio + (1.0 - ocfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg: DictConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, ocfg, max_steps))
