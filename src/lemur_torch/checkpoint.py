"""Resumable sharded checkpoints with torch.distributed.checkpoint: atomic, keep-last-K, auto-resume.

Layout of one checkpoint (`<dir>/step_00000100/`): DCP files for the sharded model and optimizer (keys as in
the HF model, so any world size and either backend reads them), `extra_state.pt` (scheduler, loader position,
step, tokens seen; written by rank 0), `rng/rank_<r>.pt`, `config.yaml` (the resolved run config) and
`meta.json` (for people). Everything is written into `.tmp-step_00000100` and renamed into place only once
complete, so a crash or a second preemption signal mid-save never leaves a checkpoint that looks usable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch.parallel.base import Backend

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(directory: str) -> List[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _STEP_DIR.match(name)
        if match and os.path.exists(os.path.join(directory, name, "meta.json")):
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str) -> Optional[str]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, cfg: DictConfig, backend: Backend):
        self.cfg = cfg
        self.ccfg = cfg.checkpoint
        self.backend = backend
        self.directory = self.ccfg.dir

    def resume_path(self) -> Optional[str]:
        resume = self.ccfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            return latest_checkpoint(self.directory)
        if not os.path.exists(os.path.join(resume, "meta.json")):
            raise FileNotFoundError(f"checkpoint.resume={resume} is not a complete checkpoint (no meta.json)")
        return resume

    def save(self, step: int, model, optimizer, scheduler, loader, trainer_state: Dict[str, Any]) -> str:
        b = self.backend
        final = os.path.join(self.directory, step_dir_name(step))
        tmp = os.path.join(self.directory, ".tmp-" + step_dir_name(step))
        if b.is_main:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted save
        b.barrier()
        b.dcp_save(b.state_dict_for_checkpoint(model, optimizer), tmp)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{b.rank}.pt"))
        loader_state = loader.state_dict()  # on every rank: the loader may gather positions collectively
        b.barrier()
        if b.is_main:
            extra = {"scheduler": scheduler.state_dict(), "loader": loader_state, "trainer": trainer_state,
                     "world_size": b.world_size, "backend": b.name}
            torch.save(extra, os.path.join(tmp, "extra_state.pt"))
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(OmegaConf.to_yaml(self.cfg, resolve=True))
            meta = {"step": step, "time": time.time(), **{k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))},
                    "world_size": b.world_size, "backend": b.name}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        b.barrier()
        return final

    def _prune(self) -> None:
        for path in list_checkpoints(self.directory)[: -self.ccfg.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str, model, optimizer, scheduler, loader) -> Dict[str, Any]:
        b = self.backend
        state = b.state_dict_for_checkpoint(model, optimizer)
        b.dcp_load(state, path)
        b.load_state_dict_from_checkpoint(model, optimizer, state)
        extra = torch.load(os.path.join(path, "extra_state.pt"), weights_only=False)
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["loader"])
        rng_file = os.path.join(path, "rng", f"rank_{b.rank}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return dict(extra["trainer"])
