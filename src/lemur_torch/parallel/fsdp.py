"""FSDP2 backend: DeviceMesh, activation checkpointing (checkpointing.py), per-block compile, fully_shard with the
mixed-precision policy (bf16 compute, `parallel.reduce_dtype` reduce-scatters); CUDA (nccl) and CPU (gloo).

A single process is the same code on a 1-rank process group, so the smoke run, the tests and a 512-GPU run
share every line. Order of application (as in torchtitan): float8 conversion of the linears -> activation
checkpointing -> compile -> fully_shard per decoder layer -> fully_shard of the root -> materialise shards ->
init or load weights. The config rules (mesh, precision, attention, float8) are fsdp_rules.py, shared with the
gate; pretrained weights come through lemur_torch.weights, as on the XLA backend.

Float8 (`parallel.float8`, lemur_torch.parallel.float8): the conversion runs first, so the checkpoint wrapper
and the compiled layer contain the float8 linears and fully_shard sees tensorwise's float8 all-gather weights;
after every optimizer step `after_optimizer_step` precomputes those weights' scales; checkpoints and the HF
export hold the plain high-precision weights (`float8.plain_state_dict`), so any run reads them.
"""

from __future__ import annotations

import os
import resource
import shutil
from concurrent.futures import Future
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig
from torch import nn
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files_on_every_rank
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from lemur_torch import attention
from lemur_torch.model import build_meta_model, full_shape_and_slices, reset_rope_buffers
from lemur_torch.model import init_weights as init_model_weights
from lemur_torch.parallel import float8, fsdp_rules
from lemur_torch.parallel.base import Backend
from lemur_torch.parallel.checkpointing import checkpoint_layer
from lemur_torch.parallel.process_group import init_process_group
from lemur_torch.parallel.save_plans import CachingSavePlanner, LeanMetadataWriter, drop_cache, new_cache_key
from lemur_torch.weights import (
    VOCAB_KEYS,
    check_pretrained_config,
    pad_vocab_rows,
    resolve_pretrained,
    shard_files_by_size,
)


class FsdpBackend(Backend):
    name = "fsdp"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        device_type = fsdp_rules.device_type()
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        init_process_group(device_type)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        )
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.num_devices = self.world_size
        self._checkpoint_group = None  # gloo group of DCP's background collectives (asynchronous saves)
        self._stagers: Dict[bool, Any] = {}  # pinned -> DefaultStager, reused across saves
        self._plans = new_cache_key()  # this run's cached checkpoint plans (save_plans.py)
        self.device_kind = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
        self.replicate, shard = fsdp_rules.mesh_shape(cfg, self.world_size)
        if self.replicate > 1:
            self.mesh = init_device_mesh(
                device_type, (self.replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
            )
        else:
            self.mesh = init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard",))
        self.mp_policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=fsdp_rules.reduce_dtype(cfg, device_type))
            if fsdp_rules.param_dtype(cfg, device_type) == torch.bfloat16
            else MixedPrecisionPolicy()
        )
        self.attention_selection = fsdp_rules.select_attention(cfg, device_type)
        self.attention = self.attention_selection.summary
        self.float8_plan = fsdp_rules.float8_plan(cfg, self.device)
        self.float8_conversion = float8.Float8Conversion(self.float8_plan)  # the counts once setup_model ran

    # -- model -------------------------------------------------------------------------------------
    def setup_model(self, cfg: DictConfig, init_weights: bool = True) -> nn.Module:
        model = build_meta_model(cfg.model)
        attention.install(model, self.attention_selection)
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
        self.float8_conversion = apply_fsdp(model, self.mesh, p, self.mp_policy, self.float8_plan)
        self.float8 = self.float8_conversion.describe()

    def load_hf_weights(self, model: nn.Module, name: str, model_cfg: DictConfig) -> None:
        """HF safetensors read straight into the local shards (DCP's HuggingFaceStorageReader).

        A checkpoint with a smaller vocabulary fills the first rows of the embedding and lm_head, the new rows
        padded by lemur_torch.weights.pad_vocab_rows. Those two tensors are read whole on every rank (1 GiB each
        at 70B in fp32), everything else only as the local shard.
        """
        path = resolve_pretrained(name)
        hf_vocab = check_pretrained_config(path, model_cfg)
        state = get_model_state_dict(model)
        if model_cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        resized = {}
        if hf_vocab < model_cfg.vocab_size:
            for key in VOCAB_KEYS:
                if key in state:
                    resized[key] = state[key]
                    state[key] = torch.empty(hf_vocab, model_cfg.hidden_size, dtype=torch.float32)
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(path))
        for key, target in resized.items():
            padded = pad_vocab_rows(state[key], model_cfg.vocab_size)
            _, slices = full_shape_and_slices(target)
            local = target.to_local() if hasattr(target, "to_local") else target
            local.copy_(padded[slices].to(local.dtype))
            state[key] = target
        set_model_state_dict(model, state)

    # -- step --------------------------------------------------------------------------------------
    def device_batches(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, Any]]:
        # a copy from pageable memory waits for the device's queue, one from pinned memory does not: batches are
        # pinned on the host first (into the CUDA caching host allocator's reused blocks), as DataLoader's
        # pin_memory does; only for a CUDA device, where non_blocking means anything
        pin = self.device.type == "cuda"
        for batch in batches:
            # the varlen boundaries are made here on the host: max_seqlen stays a Python int
            batch = attention.with_varlen_boundaries(batch)
            yield {
                k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }

    def prepare_backward(self, model: nn.Module, micro_step: int, num_micro_steps: int) -> None:
        """HSDP: gradients are reduce-scattered within the shard group after every micro-batch (each rank
        keeps only its shard of them), but all-reduced across replicas only after the last one, which sums
        the accumulated shards (FSDP2's partial-reduce buffer): one cross-replica all-reduce per step, not
        one per micro-batch. Plain FSDP reduce-scatters every micro-batch: skipping it would keep a full
        unsharded gradient on every rank."""
        if self.replicate > 1 and isinstance(model, FSDPModule):
            model.set_requires_all_reduce(micro_step == num_micro_steps - 1)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.float8_conversion.after_optimizer_step(model)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict_for_checkpoint(self, model, optimizer) -> Dict[str, Any]:
        # plain tensors: DCP would otherwise pickle torchao's float8 weight wrappers into the checkpoint; loading
        # into them writes the wrapped tensors in place
        state = {"model": float8.plain_state_dict(get_model_state_dict(model))}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        return state

    def load_state_dict_from_checkpoint(self, model, optimizer, state) -> None:
        set_model_state_dict(model, state["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, state["optim"])

    def dcp_save(self, state, path) -> None:
        dcp.save(state, storage_writer=LeanMetadataWriter(path), planner=CachingSavePlanner(self._plans))

    def prepare_async_saves(self) -> None:
        """The gloo group DCP's background thread runs its collectives on (the plan, the write results): on the
        training's own group they would interleave with the main thread's and pair up differently on different
        ranks. Creating it connects every rank with every other, so it is made at start, never mid-run."""
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")

    def dcp_async_save(self, state, path, pinned: bool) -> Tuple[Future, Future]:
        if self._checkpoint_group is None:
            raise RuntimeError("prepare_async_saves() runs on every rank at start, before an asynchronous save")
        stager = self._stagers.get(pinned)
        if stager is None:
            # kept across saves: the stager caches one host buffer per source storage and refills it, so only
            # the first save allocates (and pins). Pinned memory and non-blocking copies exist on CUDA only;
            # on CPU `pinned` is the same background staging into pageable buffers.
            cuda = self.device.type == "cuda"
            options = StagingOptions(
                use_pinned_memory=pinned and cuda,
                use_shared_memory=False,
                use_async_staging=pinned,
                use_non_blocking_copy=pinned and cuda,
            )
            stager = self._stagers[pinned] = DefaultStager(options)
            stager._synchronize_after_execute = False  # synchronous staging is done when async_save returns
        result = dcp.async_save(
            state,
            storage_writer=LeanMetadataWriter(path),
            planner=CachingSavePlanner(self._plans),
            process_group=self._checkpoint_group,
            async_stager=stager,
        )
        if isinstance(result, AsyncSaveResponse):
            return result.staging_completion, result.upload_completion
        staged: Future = Future()
        staged.set_result(None)
        return staged, result

    def dcp_load(self, state, path) -> None:
        dcp.load(state, checkpoint_id=path)

    def export_hf(
        self, model: nn.Module, out_dir: str, max_shard_size_mb: int, dtype: torch.dtype = torch.float32
    ) -> None:
        """Each rank writes its shards, then the output files are consolidated in parallel (file i on rank
        i % world): no rank ever materialises the full model."""
        state = float8.plain_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v.to(dtype) for k, v in state.items()}
        mapping = shard_files_by_size(state, max_shard_size_mb)
        sharded_dir = os.path.join(out_dir, "sharded")
        dcp.save(
            state,
            storage_writer=dcp.HuggingFaceStorageWriter(
                sharded_dir, fqn_to_index_mapping=mapping, save_distributed=True
            ),
        )
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
        return {"rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    def shutdown(self) -> None:
        for stager in self._stagers.values():
            stager.close()
        self._stagers.clear()
        drop_cache(self._plans)
        if dist.is_initialized():
            dist.destroy_process_group()


def apply_fsdp(
    model: nn.Module,
    mesh,
    p: DictConfig,
    mp_policy: MixedPrecisionPolicy,
    float8_plan: Optional[float8.Float8Plan] = None,
) -> float8.Float8Conversion:
    """Float8 conversion -> activation checkpointing -> compile -> fully_shard per decoder layer -> fully_shard
    of the root. Returns what the float8 conversion did (nothing without a plan: float8 `none`).

    fully_shard is applied only when it has work to do: sharding over more than one rank, or casting for
    mixed precision. On one process in fp32 (the CPU smoke run) it would only add a copy-in/copy-out per
    layer (about 9% of the tiny model's step on CPU, bench/trainer_overhead.py); the parameters are then
    plain tensors, and checkpoints keep the same keys and load on any world size. Without fully_shard there is
    no all-gather, so tensorwise float8 then skips its all-gather weight wrapper.
    """
    shard = mesh.size() > 1 or mp_policy.param_dtype is not None
    conversion = float8.convert(model, float8_plan or float8.Float8Plan(), all_gather=shard)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer = checkpoint_layer(layer, i, p)
        if p.compile:
            layer.compile()
        if shard:
            # the last layer's backward comes first: kept gathered, it is not gathered again right away
            reshard = p.reshard_after_forward and (p.reshard_last_layer or i < len(layers) - 1)
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
        layers[i] = layer
    if not shard:
        return conversion
    # the root holds embeddings, final norm and lm_head; no reshard: backward needs them right away
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)
    # the trainer divides the loss by the global token count itself, so gradients are reduced as a plain
    # sum (no averaging); SUM-only collectives also work on gloo, which has no PREMUL_SUM
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return conversion
