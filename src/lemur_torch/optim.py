"""AdamW with Llama's parameter groups (no weight decay on norms and biases) and warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Dict, List

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
    groups = [{"params": params, **hyper} for params, hyper in zip((decay, no_decay), group_hyperparameters(ocfg))]
    return torch.optim.AdamW(
        groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, fused=impl == "fused", foreach=impl == "foreach"
    )


def group_hyperparameters(ocfg: DictConfig) -> List[Dict[str, Any]]:
    """The config's hyperparameters of the two parameter groups: [decayed weights, norms and biases]."""
    common = {"lr": ocfg.lr, "betas": tuple(ocfg.betas), "eps": ocfg.eps}
    return [{**common, "weight_decay": ocfg.weight_decay}, {**common, "weight_decay": 0.0}]


def apply_config_on_resume(optimizer: torch.optim.Optimizer, scheduler, ocfg: DictConfig) -> List[str]:
    """The rule on resume: the config's optim.lr, betas, eps and weight_decay win over the checkpoint's, and the
    schedule keeps its position. Loading a checkpoint restores the old values twice over (the optimizer's
    param groups carry lr, betas, eps, weight_decay and initial_lr; LambdaLR's state carries base_lrs), so they
    are set again here; the schedule's shape (warmup, decay, min_lr_ratio, max_steps) always comes from the
    config, as the lambda is not saved. Returns one line per changed setting."""
    changes = []
    old_lr = scheduler.base_lrs[0]
    if old_lr != ocfg.lr:
        changes.append(
            f"optim.lr: {old_lr:g} in the checkpoint -> {ocfg.lr:g} from the config (the schedule goes on from step "
            f"{scheduler.last_epoch} with the new peak)"
        )
    for key in ("betas", "eps", "weight_decay"):
        old, new = optimizer.param_groups[0][key], group_hyperparameters(ocfg)[0][key]
        if (list(old) if key == "betas" else old) != (list(new) if key == "betas" else new):
            changes.append(f"optim.{key}: {_fmt(old)} in the checkpoint -> {_fmt(new)} from the config")
    for group, hyper in zip(optimizer.param_groups, group_hyperparameters(ocfg)):
        group.update({k: v for k, v in hyper.items() if k != "lr"}, initial_lr=ocfg.lr)
    scheduler.base_lrs = [ocfg.lr] * len(optimizer.param_groups)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports for the next step
    return changes


def _fmt(value) -> str:
    return "[" + ", ".join(f"{v:g}" for v in value) + "]" if isinstance(value, (list, tuple)) else f"{value:g}"


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
