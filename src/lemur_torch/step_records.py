"""The records one optimizer step hands along (lemur_torch.trainer runs the step): its gradients and guard on the
device (`Gradients`), its metrics packed into one device tensor and read once on the host (`StepMetrics`), the
step in flight until that read (`InFlight`, the one-step-late read: trainer.py's module docstring), and a step's
micro-batches or its reader's failure (`MicroBatches`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from lemur_torch.batch import DeviceBatch
from lemur_torch.errors import LemurError
from lemur_torch.parallel.base import DeferredRead


@dataclass
class Gradients:
    """A step after its forward/backward and clipping, before its update: device tensors, nothing read."""

    loss: torch.Tensor  # global mean over label tokens
    grad_norm: torch.Tensor  # before clipping
    finite: torch.Tensor  # 0-d bool: loss and grad norm are finite (the guard)
    label_tokens: torch.Tensor  # global count
    sums: torch.Tensor  # all-reduced [loss sum, per-domain loss sums, per-domain label-token counts]


@dataclass
class StepMetrics:
    """A step's metrics on the host. They travel as one small device tensor (`pack`), read once (`unpack`)."""

    loss: float
    grad_norm: float
    finite: bool
    label_tokens: int
    domain_loss: Dict[str, Optional[float]]
    applied_updates: int  # the device's count of updates applied since step 0, this step's included

    @staticmethod
    def pack(g: Gradients, applied_updates: torch.Tensor) -> torch.Tensor:
        """[loss, grad_norm, finite, label_tokens, applied updates, loss sum, per-domain sums, per-domain
        counts]. `applied_updates`: the device's count (lemur_torch.optim.DeviceLR.applied; exact in float32 up
        to 2**24 steps)."""
        return torch.cat(
            [
                g.loss.view(1),
                g.grad_norm.detach().float().view(1).to(g.loss.device),
                g.finite.float().view(1),
                g.label_tokens.view(1),
                applied_updates.float().view(1),
                g.sums,
            ]
        )

    @classmethod
    def unpack(cls, values: List[float], domains: List[str]) -> "StepMetrics":
        n = len(domains)
        sums, counts = values[6 : 6 + n], values[6 + n : 6 + 2 * n]
        return cls(
            loss=values[0],
            grad_norm=values[1],
            finite=values[2] > 0,
            label_tokens=int(values[3]),
            domain_loss={d: (sums[i] / counts[i] if counts[i] > 0 else None) for i, d in enumerate(domains)},
            applied_updates=int(values[4]),
        )


@dataclass
class InFlight:
    """A dispatched optimizer step whose metrics are still on their way from the device."""

    step: int
    metrics: DeferredRead  # StepMetrics.pack's tensor, on its way to the host
    started: float  # when the step began, its data wait included
    data_time: float
    tokens_seen: int


@dataclass
class MicroBatches:
    """A step's micro-batches on this process, or the failure of the reader that was to make them."""

    micro: List[DeviceBatch]
    mark: Any  # the loader's position before them (Loader.mark)
    started: float  # when the step began
    data_time: float
    failure: Optional[LemurError] = None  # DataReadError, or BadInputError with data.strict=true
