"""Parallel backends behind one interface (base.Backend): FSDP2 (GPU clusters, CPU/gloo) and torch_xla SPMD.

`check_config` runs the named backend's config rules (fsdp_rules.py, xla/rules.py) for the gate, before any
process group exists; `build_backend` builds the backend. Importing this package never imports torch_xla:
only building the XLA backend does.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lemur_torch.parallel import fsdp_rules
from lemur_torch.parallel.base import Backend
from lemur_torch.parallel.xla import rules as xla_rules

_RULES = {"fsdp": fsdp_rules, "xla_spmd": xla_rules}


def check_config(cfg: DictConfig, world_size: int) -> None:
    """The rules of `parallel.backend` for a run of `world_size` processes (ConfigError naming the key)."""
    _RULES[str(cfg.parallel.backend)].check_config(cfg, world_size)


def build_backend(cfg: DictConfig) -> Backend:
    if cfg.parallel.backend == "xla_spmd":
        # imports torch_xla, which exists only in an XLA environment (and claims the process's device setup)
        from lemur_torch.parallel.xla.backend import XlaSpmdBackend

        return XlaSpmdBackend(cfg)
    # imports transformers and torch.distributed's FSDP: seconds the gate (check_config) does without
    from lemur_torch.parallel.fsdp import FsdpBackend

    return FsdpBackend(cfg)
