"""Checkpoints and export of the XLA backend, through torch.distributed.checkpoint (DCP).

The state is the live XLA tensors under the HF model's names (FSDPv2's `_orig_module.` segments stripped) and
the optimizer state keyed by the same names (the layout of get_optimizer_state_dict), so DCP writes from and
loads into the shards in place with torch_xla's SPMD planners, and a checkpoint written here is read on any
mesh, by the FSDP backend and by lemur-export in a plain torch environment, and vice versa.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
import torch_xla
import torch_xla.core.xla_model as xm
from safetensors.torch import save_file
from torch import nn
from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner, SPMDSavePlanner, prime_optimizer

from lemur_torch.model import clean_fqn
from lemur_torch.weights import shard_files_by_size


def named_params(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(clean_fqn(n), p) for n, p in model.named_parameters()]


def state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
    """{'model': {hf_name: param}, 'optim': get_optimizer_state_dict's layout} over the live XLA tensors,
    so DCP writes from and loads into the shards in place."""
    torch_xla.sync()
    xm.wait_device_ops()  # a save racing an in-flight execution fails in PJRT (torch_xla #7935)
    named = named_params(model)
    state: Dict[str, Any] = {"model": dict(named)}
    if optimizer is None:
        return state
    if not optimizer.state:
        _prime_optimizer(optimizer)
    fqn = {id(p): n for n, p in named}
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [fqn[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    state["optim"] = {"state": {fqn[id(p)]: s for p, s in optimizer.state.items()}, "param_groups": groups}
    return state


def _prime_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state so DCP can load into it in place. torch_xla's prime_optimizer takes one
    zero-gradient step, which moves the weights (decay) and the hyperparameters' bookkeeping: this is only
    called before a load, which overwrites all of it."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    prime_optimizer(optimizer)
    for g, h in zip(optimizer.param_groups, hyper):
        g.update(h)
    optimizer.zero_grad(set_to_none=True)


def load_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], state: Dict[str, Any]) -> None:
    """Apply a state that `load` filled in. DCP's SPMD planner loads into the XLA tensors in place; copy only
    where it replaced an entry."""
    named = dict(named_params(model))
    with torch.no_grad():
        for n, t in state["model"].items():
            if t is not named[n]:
                named[n].copy_(t)
        if optimizer is not None:
            for n, saved in state["optim"]["state"].items():
                live = optimizer.state[named[n]]
                for k, v in saved.items():
                    if isinstance(live.get(k), torch.Tensor) and live[k] is not v:
                        live[k].copy_(v)
                    else:
                        live[k] = v
            for g, saved in zip(optimizer.param_groups, state["optim"]["param_groups"]):
                g.update({k: v for k, v in saved.items() if k != "params"})
    torch_xla.sync()


def save(state: Dict[str, Any], path: str) -> None:
    torch_xla.sync()
    xm.wait_device_ops()
    # per_thread_copy_ahead=0: DCP's overlapping loader serves CUDA streams; with torchax imported (scan,
    # Pallas) it takes torchax's `jax` device module for one and fails
    writer = dcp.FileSystemWriter(path, per_thread_copy_ahead=0)
    dcp.save(state, storage_writer=writer, planner=OncePerChunkSavePlanner())


def load(state: Dict[str, Any], path: str) -> None:
    torch_xla.sync()
    xm.wait_device_ops()
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=SPMDLoadPlanner())
    torch_xla.sync()


def export_hf(
    model: nn.Module,
    out_dir: str,
    max_shard_size_mb: int,
    dtype: torch.dtype,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
) -> None:
    """HF safetensors shards + index, through DCP: the weights are saved as a DCP checkpoint (each host
    writes its own shards, moved to the host as they are), then output file i is assembled by process
    i mod world_size from that checkpoint, one file at a time. Nothing is compiled (moving a sharded
    tensor to the host with .cpu() compiles and runs one replication program per tensor) and no host
    holds more than one output file. With several hosts `out_dir` must be on storage they all see, like
    checkpoint.dir. `barrier` waits for every host."""
    named = named_params(model)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        named = [(n, p) for n, p in named if n != "lm_head.weight"]
    staging = os.path.join(out_dir, ".dcp-weights")
    save(dict(named), staging)
    barrier()
    sizes = {n: torch.empty(p.shape, dtype=dtype, device="meta") for n, p in named}
    mapping = shard_files_by_size(sizes, max_shard_size_mb)
    count = max(mapping.values())
    fname = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i in range(1, count + 1):
        if (i - 1) % world_size != rank:
            continue
        tensors = {n: torch.empty(sizes[n].shape, dtype=torch.float32) for n in mapping if mapping[n] == i}
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(staging), no_dist=True)
        save_file(
            {n: t.to(dtype) for n, t in tensors.items()}, os.path.join(out_dir, fname[i]), metadata={"format": "pt"}
        )
        del tensors
    barrier()
    if rank == 0:
        total = sum(t.numel() * t.element_size() for t in sizes.values())
        weight_map = {n: fname[i] for n, i in mapping.items()}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()


class OncePerChunkSavePlanner(SPMDSavePlanner):
    """torch_xla's SPMDSavePlanner, writing every chunk exactly once. Its global dedup (`dedup_tensors` in
    torch_xla 2.9) keys write items by (name, offset) and drops a key from every plan after the first one
    holding it, counting each occurrence: a chunk held twice by the same host (a tensor sharded over fsdp
    and replicated over tensor on an fsdp x tensor mesh: norms, embeddings, lm_head and their Adam
    moments) was dropped from that host's own plan too, so the tensor vanished from the checkpoint. Keeping
    the first copy on each host before the global dedup leaves one writer per chunk."""

    def create_local_plan(self):
        plan = super().create_local_plan()
        seen, items = set(), []
        for item in plan.items:
            key = (item.index.fqn, item.index.offset)
            if key not in seen:
                seen.add(key)
                items.append(item)
        return dataclasses.replace(plan, items=items)
