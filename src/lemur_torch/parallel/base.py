"""The one interface between the backend-agnostic trainer and a parallel backend (FSDP2 or torch_xla SPMD).

Everything that differs between backends lives behind it: process groups and devices, how the model is
sharded and materialised, collectives, gradient clipping, step synchronisation, and how sharded state is
written to and read from torch.distributed.checkpoint. The trainer never branches on the backend.

A backend's config rules (its data-parallel size, precision, attention) are in a module of their own beside
it (fsdp_rules.py, xla/rules.py), light enough for the gate to run before any process group exists:
lemur_torch.parallel.check_config. The batch arithmetic both backends and the trainer share is here: a global
batch of `train.global_batch_tokens` is micro-batches of micro_batch_size x seq_len tokens on each of the
data-parallel shards, `grad_accum_steps` of them per optimizer step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from lemur_torch.batch import Batch, DeviceBatch
from lemur_torch.errors import ConfigError


def check_global_batch(cfg: DictConfig, dp_size: int, dp_name: str = "data-parallel size") -> None:
    """train.global_batch_tokens must be a whole number of micro-batches on each of `dp_size` data shards."""
    t = cfg.train
    per_micro = t.micro_batch_size * t.seq_len * dp_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            "train.global_batch_tokens",
            f"{t.global_batch_tokens} is not divisible by micro_batch_size x seq_len x {dp_name} "
            f"= {t.micro_batch_size} x {t.seq_len} x {dp_size} = {per_micro}",
        )


def grad_accum_steps(cfg: DictConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step on each data shard (check_global_batch has made it a whole number)."""
    t = cfg.train
    return t.global_batch_tokens // (t.micro_batch_size * t.seq_len * dp_size)


class DeferredRead:
    """A step's metrics on their way to the host (Backend.read_later): calling it waits for them and gives the
    values; `ready()` says, without waiting, whether they are there already."""

    def __init__(self, read: Callable[[], List[float]], ready: Callable[[], bool]):
        self._read, self.ready = read, ready

    def __call__(self) -> List[float]:
        return self._read()


class Backend(ABC):
    name: str = "base"
    device: torch.device
    rank: int = 0  # global process rank
    world_size: int = 1  # number of processes
    dp_rank: int = 0  # data shard this process reads (the loader's rank)
    dp_size: int = 1  # number of data shards
    num_devices: int = 1  # accelerators doing the work (MFU denominator)
    device_kind: str = "cpu"  # looked up in metrics.PEAK_FLOPS
    attention: str = ""  # the attention implementation and kernel in use, for the start-of-run log
    float8: str = ""  # what parallel.float8 runs as (recipe, device, linears converted), for the same log

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def setup_model(self, cfg: DictConfig, init_weights: bool = True) -> nn.Module:
        """Build LlamaForCausalLM on the meta device, shard it, materialise each shard (random init from
        cfg.train.seed, or cfg.model.pretrained loaded straight into the shards). Returns the wrapped model.
        init_weights=False leaves the shards uninitialised (the caller loads a checkpoint into them)."""

    @abstractmethod
    def device_batches(self, batches: Iterator[Batch]) -> Iterator[DeviceBatch]:
        """Move host batches (lemur_torch/batch.py) onto the device, sharded as needed."""

    @abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (identity where one process sees the global batch)."""

    @abstractmethod
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm in place; return the norm before clipping (a scalar tensor)."""

    def prepare_backward(self, model: nn.Module, micro_step: int, num_micro_steps: int) -> None:
        """Hook before each micro-batch backward (e.g. skip gradient sync until the last one)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
        """optimizer.step(), which changes nothing where `finite` (0-d bool tensor: loss and grad norm are
        finite) is false: the trainer's non-finite guard, decided on the device. The fused AdamW kernel takes
        it as GradScaler's `found_inf` (lemur_torch.optim.build_optimizer): a skipped step leaves weights,
        moments and AdamW's step count as they were, and nothing is read on the host. XLA masks the update
        instead (torch_xla has no fused AdamW)."""
        optimizer.found_inf = (~finite).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called after every optimizer_step, whether the guard applied the update or skipped it: the host does
        not know which without waiting for the device. For work that depends on the new weights (the FSDP
        backend's float8 weight scales); after a skipped update it recomputes the same values, which is
        harmless and cheaper than a host read of the guard."""

    def step_done(self) -> None:
        """Called once per optimizer step after optimizer.step(): XLA cuts and runs its graph here."""

    def replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        """A small host tensor put on the device whole, as a step's outputs hold such tensors (the trainer's
        on-device lr and count of applied updates). Under SPMD the placement is part of a program's signature:
        the XLA backend marks it replicated, as a step's outputs come back, so the first step after a resume
        compiles the program every later step runs (after a fresh start the first step is a program of its own
        anyway: it creates the optimizer's state)."""
        return tensor.to(self.device)

    def eval_step_done(self) -> None:
        """Called after each validation micro-batch (lemur_torch/validation.py): XLA cuts and runs its graph here,
        one graph per micro-batch, compiled once; the training steps' graphs are left as they are."""

    def read_later(self, tensor: torch.Tensor) -> "DeferredRead":
        """Start moving a step's small metrics tensor to the host (called after step_done) and return the
        handle that waits for it and gives the values; the trainer reads it one step later, or as soon as it is
        there without waiting (`ready`). On CUDA a plain .tolist() then would wait for everything queued after
        the step too (the next step's kernels): here a non-blocking copy into pinned memory and an event make
        the wait cover this step only. On XLA the tensor is the step's own output buffer, so reading it waits
        for that step only (never polled: asking would cut the trace); on CPU it is there at once."""
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            return DeferredRead(tensor.tolist, lambda: True)
        if tensor.device.type != "cuda":
            return DeferredRead(tensor.tolist, lambda: False)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read() -> List[float]:
            copied.synchronize()
            return host.tolist()

        return DeferredRead(read, copied.query)

    @abstractmethod
    def state_dict_for_checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
        """Sharded {'model': ..., 'optim': ...} for torch.distributed.checkpoint, keys as in the HF model.
        optimizer=None gives {'model': ...} only (export, evaluation)."""

    @abstractmethod
    def load_state_dict_from_checkpoint(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]
    ) -> None:
        """Apply a state dict that dcp_load filled in."""

    @abstractmethod
    def dcp_save(self, state: Dict[str, Any], path: str) -> None:
        """torch.distributed.checkpoint.save with this backend's planner, collectively."""

    def prepare_async_saves(self) -> None:
        """Collective: what asynchronous saves need set up on every rank, done once at start by every rank at the
        same point (the Checkpointer), before the first step. Nothing by default."""

    def dcp_async_save(self, state: Dict[str, Any], path: str, pinned: bool) -> Tuple[Future, Future]:
        """Start an asynchronous torch.distributed.checkpoint save of `state` into `path`, collectively.
        Returns (staged, written): `staged` completes once the state is copied off the device (training must not
        change it before: the trainer waits for it before the next optimizer step), `written` once this rank's
        part is on storage; on rank 0, DCP's coordinator, once every rank's part is (it gathers their write
        results and writes the metadata last). `pinned`: stage into reused pinned host buffers in the
        background. This default saves synchronously; a backend overrides it where it can do better."""
        self.dcp_save(state, path)
        done: Future = Future()
        done.set_result(None)
        return done, done

    @abstractmethod
    def dcp_load(self, state: Dict[str, Any], path: str) -> None:
        """torch.distributed.checkpoint.load in place, with this backend's planner, collectively."""

    @abstractmethod
    def export_hf(self, model: nn.Module, out_dir: str, max_shard_size_mb: int) -> None:
        """Write model-0000x-of-0000N.safetensors + index (weights only), without a full copy on one rank
        where the backend allows it. config.json and the tokenizer are written by lemur_torch.export."""

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value on every process."""
        return obj

    def gather_object(self, obj: Any) -> List[Any]:
        """Every process's picklable `obj`, in rank order, over the job's process group. An object collective:
        for a way out of the run (a reader's failure, named on every process), never inside a step."""
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_process(self, flags: Sequence[bool]) -> List[bool]:
        """For each flag: True on every process if it is True on any. What one process decides alone (a stop
        signal it received, a guard it read) becomes a decision all take at the same step. One all-reduce of a
        few ints over the CPU (gloo) process group; nothing on the accelerator."""
        if self.world_size == 1 or not dist.is_initialized():
            return [bool(f) for f in flags]
        votes = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return [bool(v) for v in votes.tolist()]

    def memory_stats(self) -> Dict[str, float]:
        return {}

    def shutdown(self) -> None:
        pass
