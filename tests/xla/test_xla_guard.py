"""The XLA backend's non-finite guard runs on the device: a rejected step leaves weights and AdamW moments
exactly as they were, an accepted one equals a plain optimizer.step(), and neither reads the guard on the host."""

import functools

import torch


@functools.lru_cache(maxsize=1)
def _backend():
    from lemur_torch.config import load_config
    from lemur_torch.parallel.xla import XlaSpmdBackend

    from xla_helpers import XLA

    return XlaSpmdBackend(load_config(XLA))


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
