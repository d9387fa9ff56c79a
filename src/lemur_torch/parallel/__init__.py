"""Parallel backends behind one interface (base.Backend): FSDP2 (GPU clusters, CPU/gloo) and torch_xla SPMD."""

from __future__ import annotations

from omegaconf import DictConfig

from lemur_torch.parallel.base import Backend


def build_backend(cfg: DictConfig) -> Backend:
    if cfg.parallel.backend == "xla_spmd":
        from lemur_torch.parallel.xla import XlaSpmdBackend  # torch_xla is only importable in the XLA env

        return XlaSpmdBackend(cfg)
    from lemur_torch.parallel.fsdp import FsdpBackend

    return FsdpBackend(cfg)
