"""A training step reads nothing back from the device, and the guard and the lr that now live on the device
give exactly what a plain loop gives.

No host read: one step of the FSDP backend as it runs on CUDA - bf16 mixed precision, so fully_shard shards
the model and the parameters are DTensors; the fused AdamW with the non-finite guard as `found_inf` and the lr
as a device tensor - run on the CPU under modes that raise on every tensor-to-host read (item, tolist, bool,
int, float, .cpu(), .numpy(), ops whose output shape depends on the data, device-to-host copies), except
inside the one deferred read of the step before (DeferredRead). The GPU acceptance check runs the same step
under torch.cuda.set_sync_debug_mode("error").

The same as a plain loop: the lr of every update and the weights after skipped steps, against torch's AdamW
(fused) with a LambdaLR of the documented warmup + cosine, stepped only after applied updates.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST
from fakes import contract_batch, list_trainer, tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lemur_torch import trainer as trainer_lib
from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.config import load_config
from lemur_torch.optim import group_hyperparameters
from lemur_torch.parallel.base import DeferredRead
from lemur_torch.parallel.fsdp import FsdpBackend

aten = torch.ops.aten


class HostRead(AssertionError):
    pass


class NoHostReads:
    """Both modes, active together; `allow()` lifts them (the deferred read)."""

    # Python-level reads (a CPU tensor's tolist() does not reach the dispatcher at all)
    FUNCTIONS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.nonzero,
        torch.nonzero,
    }
    # aten ops that read a value on the host or size their output by the data
    OPS = {
        aten._local_scalar_dense.default,
        aten.is_nonzero.default,
        aten.equal.default,
        aten.nonzero.default,
        aten.nonzero_static.default,
        aten.masked_select.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.bincount.default,
        aten.repeat_interleave.Tensor,
    }

    def __init__(self):
        self.allowed = False
        outer = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if not outer.allowed and func in outer.FUNCTIONS:
                    raise HostRead(f"host read inside the step: {func.__name__}")
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not outer.allowed:
                    if func in outer.OPS:
                        raise HostRead(f"host read inside the step: {func}")
                    if func is aten.index.Tensor and any(
                        i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
                    ):
                        raise HostRead("boolean indexing inside the step (its shape depends on the data)")
                    moved = [a for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"]
                    target = (kwargs or {}).get("device")
                    if func in (aten._to_copy.default, aten.copy_.default) and moved and str(target) == "cpu":
                        raise HostRead(f"device-to-host copy inside the step: {func}")
                return func(*args, **(kwargs or {}))

        self.modes = [Functions(), Ops()]

    def __enter__(self):
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self.modes):
            mode.__exit__(*exc)

    def allow(self, fn):
        def call(*args, **kwargs):
            self.allowed = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.allowed = False

        return call


class Lines:
    """A MetricsLogger stand-in that keeps the step lines."""

    enabled = True

    def __init__(self):
        self.rows = []

    def log_step(self, metrics):
        self.rows.append(metrics)

    def info(self, text):
        pass


def _batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.train.micro_batch_size, cfg.train.seq_len)
    return [contract_batch(torch.randint(3, cfg.model.vocab_size, shape, generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def bf16_backend(tmp_path_factory):
    cfg = load_config(
        [
            *FAST,
            f"run_dir={tmp_path_factory.mktemp('sync_free')}",
            "model.num_hidden_layers=2",
            "parallel.mixed_precision=bf16",
            "optim.implementation=fused",  # what auto gives on CUDA (and on the CPU)
            "train.max_steps=10",
            "log.every_steps=1",
        ]
    )
    backend = FsdpBackend(cfg)
    yield cfg, backend
    backend.shutdown()


def test_a_step_reads_nothing_from_the_device(bf16_backend, monkeypatch):
    cfg, backend = bf16_backend
    model = backend.setup_model(cfg)
    assert any(type(p).__name__ == "DTensor" for p in model.parameters()), "fully_shard must be applied"
    lines = Lines()
    t = list_trainer(cfg, backend, model, lines)
    assert t.optimizer.defaults["fused"], "the FSDP backend's optimizer is the fused AdamW on every device"
    guard = NoHostReads()
    monkeypatch.setattr(DeferredRead, "__call__", guard.allow(DeferredRead.__call__))
    batches = backend.device_batches(iter(_batches(cfg, 3 * t.grad_accum)))
    for _ in range(3):
        micro = [next(batches) for _ in range(t.grad_accum)]  # the host's batches, made before the step
        with guard:
            t.train_step(micro)  # steps 2 and 3 read the step before inside, through DeferredRead
    t.settle()
    assert [row["step"] for row in lines.rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in lines.rows)
    # the mode is able to fail: the read of a device value is caught
    with pytest.raises(HostRead), guard:
        bool(torch.isfinite(torch.ones(())))


def _plain_lambda(ocfg, max_steps):
    """warmup + cosine as documented (conf/optim/adamw.yaml), written out independently of lemur_torch.optim."""

    def fn(step):
        if step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        progress = min(1.0, (step - ocfg.warmup_steps) / (max_steps - ocfg.warmup_steps))
        return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def test_guard_and_lr_on_the_device_equal_a_plain_loop(tmp_path, monkeypatch):
    steps, nonfinite = 8, {3, 4, 7}
    cfg = load_config(
        [
            *FAST,
            f"run_dir={tmp_path}",
            "model.num_hidden_layers=1",
            "optim.warmup_steps=3",
            f"train.max_steps={steps}",
            "train.grad_clip=0.5",
            "log.every_steps=1",
        ]
    )
    backend = FsdpBackend(cfg)
    try:
        lines = Lines()
        t = list_trainer(cfg, backend, backend.setup_model(cfg), lines)
        assert t.optimizer.defaults["fused"], "optim.implementation=auto: the fused AdamW on the CPU as on CUDA"
        real_loss = trainer_lib.token_loss_sums

        def loss_sums(*args):
            s, ds, dc = real_loss(*args)
            return (s * float("nan") if t.step + 1 in nonfinite else s), ds, dc

        monkeypatch.setattr(trainer_lib, "token_loss_sums", loss_sums)
        data = _batches(cfg, steps * t.grad_accum, seed=1)
        weights = []
        for step in range(steps):
            t.train_step(data[step * t.grad_accum : (step + 1) * t.grad_accum])
            weights.append({n: p.detach().clone() for n, p in t.model.named_parameters()})
        t.settle()
    finally:
        backend.shutdown()

    ref = tiny_model(cfg)
    decayed = {n for n, p in ref.named_parameters() if p.ndim >= 2 and "norm" not in n and not n.endswith(".bias")}
    decay = [p for n, p in ref.named_parameters() if n in decayed]
    no_decay = [p for n, p in ref.named_parameters() if n not in decayed]
    groups = [{"params": ps, **h} for ps, h in zip((decay, no_decay), group_hyperparameters(cfg.optim))]
    opt = torch.optim.AdamW(groups, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _plain_lambda(cfg.optim, steps))
    lrs, ref_weights = [], []
    for step in range(1, steps + 1):
        micro = data[(step - 1) * t.grad_accum : step * t.grad_accum]
        count = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro)
        for mb in micro:
            logits = ref(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            targets = F.pad(mb["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
            s = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            ((s * float("nan") if step in nonfinite else s) / count).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.train.grad_clip)
        lrs.append(sched.get_last_lr()[0])
        if step not in nonfinite:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        ref_weights.append({n: p.detach().clone() for n, p in ref.named_parameters()})

    assert [row["lr"] for row in lines.rows] == lrs, "the lr of every update, exactly"
    assert len(set(lrs)) > 3, "warmup and decay make the lrs differ, or the test proves nothing"
    assert [row["skipped_steps"] for row in lines.rows] == [0, 0, 1, 2, 2, 2, 3, 3]
    for step in nonfinite:  # a skipped step changes no weight at all
        assert all(torch.equal(weights[step - 1][n], weights[step - 2][n]) for n in weights[0]), step
    for step in range(steps):
        for n, w in weights[step].items():
            torch.testing.assert_close(w, ref_weights[step][n], rtol=1e-5, atol=1e-6, msg=f"step {step + 1} {n}")
    applied = steps - len(nonfinite)
    assert all(int(st["step"]) == applied for st in t.optimizer.state.values()), "AdamW counts applied updates"
    assert t.scheduler.last_epoch == sched.last_epoch == applied
