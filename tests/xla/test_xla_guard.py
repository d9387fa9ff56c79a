"""The XLA backend's non-finite guard runs on the device: a rejected step leaves weights and AdamW moments
exactly as they were, an accepted one equals a plain optimizer.step(), and neither reads the guard on the host.
Also in this process (one backend): the memory report on TPU and the device kinds MFU is looked up by."""

import functools

import torch


@functools.lru_cache(maxsize=1)
def _backend():
    from xla_helpers import XLA

    from lemur_torch.config import load_config
    from lemur_torch.parallel.xla.backend import XlaSpmdBackend

    return XlaSpmdBackend(load_config([*XLA, "parallel.xla_cache_dir=null"]))


def _setup():
    import torch_xla

    backend = _backend()
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4).to(backend.device)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, foreach=True)
    for p in lin.parameters():  # one accepted step first, so there are moments to protect
        p.grad = torch.ones_like(p)
    opt.step()
    torch_xla.sync()
    return backend, lin, opt


def _snapshot(lin, opt):
    params = [p.detach().cpu().clone() for p in lin.parameters()]
    moments = [opt.state[p][k].detach().cpu().clone() for p in lin.parameters() for k in ("exp_avg", "exp_avg_sq")]
    return params + moments


def test_rejected_step_changes_nothing_and_stays_on_device():
    import torch_xla
    import torch_xla.debug.metrics as met

    backend, lin, opt = _setup()
    before = _snapshot(lin, opt)
    for p in lin.parameters():
        p.grad = torch.full_like(p, float("nan"))
    transfers = met.metric_data("TransferFromDeviceTime")
    backend.optimizer_step(opt, torch.tensor(False, device=backend.device))
    assert met.metric_data("TransferFromDeviceTime") == transfers, "the guard was read on the host"
    torch_xla.sync()
    for a, b in zip(before, _snapshot(lin, opt)):
        assert torch.equal(a, b)


def test_accepted_step_is_a_plain_step():
    import torch_xla

    backend, lin, opt = _setup()
    _, ref_lin, ref_opt = _setup()  # the same seed: identical weights and moments
    torch.manual_seed(1)
    grads = [torch.randn(p.shape) for p in lin.parameters()]
    for model, g_list in ((lin, grads), (ref_lin, grads)):
        for p, g in zip(model.parameters(), g_list):
            p.grad = g.to(backend.device)
    backend.optimizer_step(opt, torch.tensor(True, device=backend.device))
    ref_opt.step()
    torch_xla.sync()
    for a, b in zip(_snapshot(lin, opt), _snapshot(ref_lin, ref_opt)):
        assert torch.equal(a, b)


def test_memory_stats_on_tpu(monkeypatch):
    """PJRT's allocator stats (what a TPU reports; the CPU client keeps none) in the FSDP backend's keys."""
    import torch_xla.core.xla_model as xm

    backend = _backend()
    assert backend.memory_stats() == {}  # CPU
    gib = 2**30
    monkeypatch.setattr(
        xm,
        "get_memory_info",
        lambda device=None: {"bytes_used": 3 * gib, "bytes_limit": 32 * gib, "peak_bytes_used": 5 * gib},
    )
    assert backend.memory_stats() == {"mem_alloc_gib": 5.0, "mem_in_use_gib": 3.0, "mem_limit_gib": 32.0}


def test_mfu_peak_for_tpu_device_kinds(monkeypatch):
    """Under SPMD the backend names the chip as PJRT does, from the TPU VM's accelerator type, and each TPU
    generation finds its peak in the table (v5p's "TPU v5" is also a prefix of v5e's "TPU v5 lite")."""
    from torch_xla._internal import tpu

    from lemur_torch.metrics import peak_flops
    from lemur_torch.parallel.xla.tpu import pjrt_device_kind

    assert _backend().device_kind == "cpu"
    expected = {
        "v4-512": ("TPU v4", 275e12),
        "v5litepod-256": ("TPU v5 lite", 197e12),
        "v5p-1024": ("TPU v5", 459e12),
        "v6e-256": ("TPU v6 lite", 918e12),
    }
    for accelerator, (kind, peak) in expected.items():
        monkeypatch.setattr(tpu, "get_tpu_type", lambda accelerator=accelerator: accelerator.split("-")[0])
        assert pjrt_device_kind("TPU") == kind
        assert peak_flops("auto", kind) == peak, kind
