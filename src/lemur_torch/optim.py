"""AdamW with Llama's parameter groups (no weight decay on norms and biases), the warmup + cosine schedule, and
the schedule on the device (`DeviceLR`).

The schedule is one formula, `lr_multiplier`, written as tensor ops. The host evaluates it in the LambdaLR that
`build_scheduler` returns, stepped once per applied update as the trainer reads them (one step late): that is
what checkpoints hold (LambdaLR's state: `base_lrs`, `last_epoch` = updates applied), what resumes, and what a
step's log line reports. The update itself takes its lr from `DeviceLR`: an on-device count of applied updates
(advanced by the step's own finite guard, on the device) and the same formula over it, handed to AdamW as a
tensor, so no step waits for the host to learn whether the step before was applied.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List

import torch
from omegaconf import DictConfig
from torch import nn


def build_optimizer(model: nn.Module, ocfg: DictConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW whose update takes a tensor lr and can be skipped on the device: fused on CPU and CUDA (its kernel
    skips the update where `found_inf` is set, as under GradScaler: Backend.optimizer_step), capturable for_loop
    under torch_xla, which has no fused kernel (torch's capturable foreach refuses xla tensors) and masks the
    update instead."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(param)
    impl = ocfg.implementation
    if impl == "auto":
        impl = "for_loop" if device_type == "xla" else "fused"
    groups = [{"params": params, **hyper} for params, hyper in zip((decay, no_decay), group_hyperparameters(ocfg))]
    return torch.optim.AdamW(
        groups,
        lr=ocfg.lr,
        betas=tuple(ocfg.betas),
        eps=ocfg.eps,
        fused=impl == "fused",
        foreach=impl == "foreach",
        capturable=impl != "fused",  # a tensor lr and an on-device step count without fused (torch_xla)
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
    changes += keep_built_implementation(optimizer)
    for group, hyper in zip(optimizer.param_groups, group_hyperparameters(ocfg)):
        group.update({k: v for k, v in hyper.items() if k != "lr"}, initial_lr=ocfg.lr)
    scheduler.base_lrs = [ocfg.lr] * len(optimizer.param_groups)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports for the next step
    return changes


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def keep_built_implementation(optimizer: torch.optim.Optimizer) -> List[str]:
    """Loading an optimizer state restores the saved param groups' implementation flags too, so a checkpoint of
    another AdamW (an older foreach run, the XLA backend's capturable for_loop) would run this one's update
    through a kernel that cannot take the device-side guard. The flags the optimizer was built with (its
    `defaults`) are put back, and each step count is moved where the fused/capturable kernels read it (a float32
    tensor on the parameter's device). Returns a line when the checkpoint's flags differed."""
    built = {k: optimizer.defaults.get(k) for k in IMPLEMENTATION_KEYS}
    saved = {k: optimizer.param_groups[0].get(k) for k in IMPLEMENTATION_KEYS}
    for group in optimizer.param_groups:
        group.update(built)
    if built["fused"] or built["capturable"]:
        for param, state in optimizer.state.items():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)
    if saved == built:
        return []
    fmt = lambda flags: ", ".join(f"{k}={v}" for k, v in flags.items())  # noqa: E731
    return [f"optimizer: the checkpoint's AdamW ({fmt(saved)}) -> this run's ({fmt(built)})"]


def _fmt(value) -> str:
    return "[" + ", ".join(f"{v:g}" for v in value) + "]" if isinstance(value, (list, tuple)) else f"{value:g}"


def lr_multiplier(step, ocfg: DictConfig, max_steps: int):
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine decay to
    min_lr_ratio over decay_steps (default max_steps), then flat. `step` is a Python number (the host's LambdaLR)
    or a floating 0-d tensor on any device (DeviceLR): the same operations in the same order either way, with no
    data-dependent branch on a tensor, so the device computes it inside a step without the host."""
    tensor = torch.is_tensor(step)
    warmup = ocfg.warmup_steps
    warm = (step + 1) / max(warmup, 1)
    if ocfg.schedule == "constant":
        after = 1.0
    else:
        total = ocfg.decay_steps or max_steps
        progress = (step - warmup) / max(1, total - warmup)
        progress = progress.clamp(max=1.0) if tensor else min(1.0, progress)
        cos = torch.cos(math.pi * progress) if tensor else math.cos(math.pi * progress)
        after = ocfg.min_lr_ratio + (1.0 - ocfg.min_lr_ratio) * 0.5 * (1.0 + cos)
    if tensor:
        return torch.where(step < warmup, warm, after)
    return warm if step < warmup else after


def lr_lambda(step: int, ocfg: DictConfig, max_steps: int) -> float:
    """`lr_multiplier` on the host, for LambdaLR."""
    return float(lr_multiplier(step, ocfg, max_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg: DictConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, ocfg, max_steps))


class DeviceLR:
    """The lr of every update, computed on the device from an on-device count of applied updates.

    `applied_to(optimizer)` puts this step's lr into the param groups as 0-d device tensors for the update and
    puts the host's floats (the LambdaLR's, what checkpoints hold) back after it; `count(finite)` advances the
    count by the step's guard, on the device. The count starts at the host scheduler's `last_epoch` (`sync`, at
    start and after a resume). Dtypes: the schedule is computed in float64 where the device has it (torch_xla's
    TPUs do not: float32 there); the lr tensor is what the update kernel reads: a double on the CPU's fused
    AdamW, a float on CUDA's (its tensor-lr kernel reads float32) and under torch_xla.
    """

    def __init__(
        self,
        scheduler,
        ocfg: DictConfig,
        max_steps: int,
        device: torch.device,
        place: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.ocfg, self.max_steps = ocfg, max_steps
        self.dtype = torch.float32 if device.type == "xla" else torch.float64
        lr_dtype = torch.float64 if device.type == "cpu" else torch.float32
        # how a host tensor goes onto the device (Backend.replicated): as the step's outputs hold it
        self.place = place
        # data, not pending ops (see sync): under torch_xla an op would join the first step's graph only
        self.lrs = [self.place(torch.zeros((), dtype=lr_dtype)) for _ in scheduler.base_lrs]
        self.sync(scheduler)

    def sync(self, scheduler) -> None:
        """Take the host scheduler's peak lrs and position (at start and on resume). The count is copied from the
        host as data, not written by an op, and placed as the step returns it (Backend.replicated): under
        torch_xla a pending fill, or a tensor placed otherwise, would make the next step a program of its own (a
        recompilation after every resume)."""
        self.base_lrs = list(scheduler.base_lrs)
        self.applied = self.place(torch.tensor(float(scheduler.last_epoch), dtype=self.dtype))

    @contextmanager
    def applied_to(self, optimizer: torch.optim.Optimizer) -> Iterator[None]:
        multiplier = lr_multiplier(self.applied, self.ocfg, self.max_steps)
        host = [group["lr"] for group in optimizer.param_groups]
        for group, lr, base in zip(optimizer.param_groups, self.lrs, self.base_lrs):
            lr.copy_(multiplier * base)
            group["lr"] = lr
        try:
            yield
        finally:
            for group, lr in zip(optimizer.param_groups, host):
                group["lr"] = lr

    def count(self, finite: torch.Tensor) -> None:
        self.applied.add_(finite.to(self.dtype))
