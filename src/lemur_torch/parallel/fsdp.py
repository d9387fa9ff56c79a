"""FSDP2 backend: DeviceMesh, activation checkpointing, per-block compile, fully_shard; CUDA (nccl) and CPU (gloo).

A single process is the same code on a 1-rank process group, so the smoke run, the tests and a 512-GPU run
share every line. Order of application (as in torchtitan): activation checkpointing -> compile -> fully_shard
per decoder layer -> fully_shard of the root -> materialise shards -> init or load weights.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from typing import Any, Dict, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lemur_torch.config import ConfigError
from lemur_torch.model import _full_shape_and_slices, build_meta_model, reset_rope_buffers
from lemur_torch.model import init_weights as init_model_weights
from lemur_torch.parallel.base import Backend

log = logging.getLogger(__name__)


def init_process_group(device_type: str) -> None:
    """Join the job's process group: torchrun/accelerate/srun set RANK and WORLD_SIZE; otherwise 1 rank."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=int(os.environ.get("LEMUR_PG_TIMEOUT_S", "1800")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def resolve_pretrained(name: str, is_main: bool) -> str:
    """A local HF folder as is; a hub id is downloaded (safetensors + config) by rank 0 first."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "tokenizer.model"]
    if is_main:
        snapshot_download(name, allow_patterns=patterns)
    if dist.is_initialized():
        dist.barrier()
    return snapshot_download(name, allow_patterns=patterns, local_files_only=True)


def check_pretrained_config(path: str, model_cfg: DictConfig) -> int:
    """Fail on an architecture mismatch; return the checkpoint's vocabulary size (<= model.vocab_size)."""
    import json

    import fsspec

    with fsspec.open(f"{path.rstrip('/')}/config.json") as f:  # a folder or a URL (the XLA backend reads gs://, hf://)
        hf = json.load(f)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        if key in hf and hf[key] != model_cfg[key]:
            raise ConfigError(f"model.{key}", f"{model_cfg[key]} but {path}/config.json has {hf[key]}; pick the matching model= group")
    if hf.get("vocab_size", model_cfg.vocab_size) > model_cfg.vocab_size:
        raise ConfigError("model.vocab_size", f"{model_cfg.vocab_size} is smaller than the checkpoint's {hf['vocab_size']}")
    return int(hf.get("vocab_size", model_cfg.vocab_size))


class FsdpBackend(Backend):
    name = "fsdp"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_process_group(device_type)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.num_devices = self.world_size
        self.device_kind = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
        p = cfg.parallel
        replicate = p.dp_replicate
        shard = self.world_size // replicate if p.dp_shard == -1 else p.dp_shard
        if replicate * shard != self.world_size:
            raise ConfigError("parallel.dp_shard", f"dp_replicate x dp_shard = {replicate} x {shard} != world size {self.world_size}")
        if replicate > 1:
            self.mesh = init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
        else:
            self.mesh = init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
        precision = p.mixed_precision
        if precision == "auto":
            precision = "bf16" if device_type == "cuda" else "fp32"
        self.mp_policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16"
            else MixedPrecisionPolicy()
        )

    # -- model -------------------------------------------------------------------------------------
    def setup_model(self, cfg: DictConfig, init_weights: bool = True) -> nn.Module:
        model = build_meta_model(cfg.model)
        self.parallelize(model, cfg.parallel)
        model.to_empty(device=self.device)
        reset_rope_buffers(model, self.device)
        if not init_weights:
            return model
        if cfg.model.pretrained:
            self.load_hf_weights(model, cfg.model.pretrained, cfg.model)
        else:
            init_model_weights(model, cfg.train.seed, cfg.model.initializer_range)
        return model

    def parallelize(self, model: nn.Module, p: DictConfig) -> None:
        apply_fsdp(model, self.mesh, p, self.mp_policy)

    def load_hf_weights(self, model: nn.Module, name: str, model_cfg: DictConfig) -> None:
        """HF safetensors read straight into the local shards (DCP's HuggingFaceStorageReader).

        A checkpoint with a smaller vocabulary (Llama-2's 32000 under the chat stage's 32064 = 32000 + ChatML
        tokens, padded to a multiple of 64) fills the first rows of the embedding and lm_head; the new rows
        start at the mean of the existing ones. Those two tensors are read whole on every rank (1 GiB each
        at 70B in fp32), everything else only as the local shard.
        """
        path = resolve_pretrained(name, self.is_main)
        hf_vocab = check_pretrained_config(path, model_cfg)
        state = get_model_state_dict(model)
        if model_cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        resized = {}
        if hf_vocab < model_cfg.vocab_size:
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                if key in state:
                    resized[key] = state[key]
                    state[key] = torch.empty(hf_vocab, model_cfg.hidden_size, dtype=torch.float32)
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(path))
        for key, target in resized.items():
            full = state[key]
            padded = torch.cat([full, full.mean(0, keepdim=True).expand(model_cfg.vocab_size - hf_vocab, -1)])
            _, slices = _full_shape_and_slices(target)
            local = target.to_local() if hasattr(target, "to_local") else target
            local.copy_(padded[slices].to(local.dtype))
            state[key] = target
        set_model_state_dict(model, state)

    # -- step --------------------------------------------------------------------------------------
    def device_batches(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
        for batch in batches:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict_for_checkpoint(self, model, optimizer) -> Dict[str, Any]:
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        return state

    def load_state_dict_from_checkpoint(self, model, optimizer, state) -> None:
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])

    def dcp_save(self, state, path) -> None:
        dcp.save(state, checkpoint_id=path)

    def dcp_load(self, state, path) -> None:
        dcp.load(state, checkpoint_id=path)

    def export_hf(self, model: nn.Module, out_dir: str, max_shard_size_mb: int, dtype: torch.dtype = torch.float32) -> None:
        """Each rank writes its shards, then the output files are consolidated in parallel (file i on rank
        i % world): no rank ever materialises the full model."""
        from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files_on_every_rank

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v.to(dtype) for k, v in state.items()}
        mapping = shard_files_by_size(state, max_shard_size_mb)
        sharded_dir = os.path.join(out_dir, "sharded")
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(sharded_dir, fqn_to_index_mapping=mapping, save_distributed=True))
        self.barrier()
        consolidate_safetensors_files_on_every_rank(sharded_dir, out_dir, mapping)
        self.barrier()
        if self.is_main:
            shutil.rmtree(sharded_dir, ignore_errors=True)
        self.barrier()

    # -- misc --------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def memory_stats(self) -> Dict[str, float]:
        if self.device.type == "cuda":
            return {
                "mem_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            }
        import resource

        return {"rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def apply_fsdp(model: nn.Module, mesh, p: DictConfig, mp_policy: MixedPrecisionPolicy) -> None:
    """Activation checkpointing -> compile -> fully_shard per decoder layer -> fully_shard of the root.

    fully_shard is applied only when it has work to do: sharding over more than one rank, or casting for
    mixed precision. On one process in fp32 (the CPU smoke run) it would only add a copy-in/copy-out per
    layer (about 9% of the tiny model's step on CPU, bench/trainer_overhead.py); the parameters are then
    plain tensors, and checkpoints keep the same keys and load on any world size.
    """
    shard = mesh.size() > 1 or mp_policy.param_dtype is not None
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if p.activation_checkpointing == "full" or (p.activation_checkpointing == "every_n" and i % p.ac_every_n == 0):
            layer = checkpoint_wrapper(layer, preserve_rng_state=False)
        if p.compile:
            layer.compile()
        if shard:
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=p.reshard_after_forward)
        layers[i] = layer
    if not shard:
        return
    # the root holds embeddings, final norm and lm_head; no reshard: backward needs them right away
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    # the trainer divides the loss by the global token count itself, so gradients are reduced as a plain
    # sum (no averaging); SUM-only collectives also work on gloo, which has no PREMUL_SUM
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def shard_files_by_size(state: Dict[str, torch.Tensor], max_shard_size_mb: int) -> Dict[str, int]:
    """Assign tensors to output files 1..N in state-dict order, each file at most max_shard_size_mb."""
    limit = max_shard_size_mb * 2**20
    mapping: Dict[str, int] = {}
    index, used = 1, 0
    for key, value in state.items():
        size = value.numel() * value.element_size()
        if used and used + size > limit:
            index, used = index + 1, 0
        mapping[key] = index
        used += size
    return mapping
