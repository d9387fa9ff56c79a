"""torch_xla SPMD backend: FSDPv2 (`SpmdFullyShardedDataParallel`) over a (fsdp, tensor) device mesh.

One process per host drives every local device; SPMD turns the single-device program into a sharded one.
Runs on TPU pods (PJRT_DEVICE=TPU) and, for tests, on the CPU PJRT device with CPU_NUM_DEVICES virtual
devices. What it owns, and why it looks the way it does:

- Hosts: every host runs the same program on its own share of the data (`dp_rank` = host index). What a
  host decides alone (a stop signal, the resume checkpoint, the guard it reads) is agreed over a CPU (gloo)
  process group across the hosts (Backend.any_process / broadcast_object / barrier): SPMD collectives
  cover only the compiled step. The CPU PJRT client has no multi-host runtime, so in tests processes
  started with RANK/WORLD_SIZE stand in for hosts (see `_join_hosts`).
- Mesh: (fsdp, tensor) over `xr.global_runtime_device_count()` devices; `parallel.xla_tensor` sizes the
  tensor axis (1 = pure FSDP, the fastest choice whenever the model fits). With tensor > 1 the attention and
  MLP projections are split Megatron-style over `tensor` before FSDPv2 shards the rest over `fsdp`.
- Model: built on the meta device by lemur_torch.model, then materialised one parameter at a time straight
  into its shards: each host computes (name-seeded init, equal to the FSDP backend's values) or reads (HF
  safetensors by byte range from a folder, gs:// or the hub: lemur_torch.hf_weights) only the slices its
  own devices hold, so no host reads the whole model and no device holds an unsharded tensor. FSDPv2 then
  wraps each decoder layer with activation checkpointing inside the wrap (`auto_wrapper_callable`), the
  only order that works with FSDPv2; or, with `parallel.scan_layers`, the decoder layers run as one
  torch_xla scan (one layer traced and compiled, looped over stacked weights), so tracing and compiling do
  not grow with depth (80 layers at 70B).
- Attention: mask-free implementations from xla_attention (per-document masks from position_ids on the
  device; Pallas flash attention on TPU), so a training step is one graph.
- Batches: sent synchronously with `send_cpu_data_to_device`, each host's rows spread over its own devices
  (`minibatch`), sharded over both mesh axes as torch_xla requires of per-host input; the model reshards
  them to `fsdp` at its first layer. No MpDeviceLoader: its prefetch thread would run the stateful loader
  ahead of the step, so a checkpoint would record a loader position past the batches actually trained on.
- Steps: nothing here syncs with the host; `step_done` cuts the step's one graph and launches it
  asynchronously (the trainer reads the step's metrics one step later).
- Compilation: a persistent compilation cache (`parallel.xla_cache_dir`, per host), so a restarted job
  loads its step programs instead of compiling them again.
- Checkpoints: torch.distributed.checkpoint with torch_xla's SPMD planners (the save planner corrected to
  write every chunk once: see _SpmdSavePlanner), keys exactly those of the HF model (FSDPv2's
  `_orig_module.` segments stripped) and the optimizer state keyed by the same names (the layout of
  get_optimizer_state_dict), so a checkpoint written here is read on any mesh, by the FSDP backend and by
  lemur-export in a plain torch environment, and vice versa.
- Export: the same DCP save of the weights, then each host assembles some of the safetensors files from
  it: no program is compiled and no host holds more than one output file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from lemur_torch.errors import ConfigError
from lemur_torch.parallel import xla_attention
from lemur_torch.parallel.base import Backend


class XlaSpmdBackend(Backend):
    name = "xla_spmd"

    def __init__(self, cfg: DictConfig):
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        self._torch_xla, self._xs, self._xr = torch_xla, xs, xr
        p, t = cfg.parallel, cfg.train
        if p.xla_cache_dir:
            # before the runtime compiles anything; per host (each host compiles the same programs)
            os.makedirs(p.xla_cache_dir, exist_ok=True)
            xr.initialize_cache(p.xla_cache_dir, readonly=False)
        xr.use_spmd()  # before any XLA tensor exists; process-global
        n = xr.global_runtime_device_count()
        tensor = int(p.xla_tensor)
        if tensor < 1 or n % tensor:
            raise ConfigError("parallel.xla_tensor", f"{tensor} does not divide the {n} devices")
        self.mesh = xs.Mesh(np.arange(n), (n // tensor, tensor), ("fsdp", "tensor"))
        xs.set_global_mesh(self.mesh)
        self.fsdp_size, self.tensor_size = n // tensor, tensor

        self.device = torch_xla.device()
        self.device_type = xr.device_type()
        self.device_kind = _pjrt_device_kind(self.device_type)
        self.num_devices = n
        # each host reads its own share of the data; SPMD stitches the host batches into one global array
        self.hosts = xr.process_count()
        self.dp_rank, self.dp_size = xr.process_index(), self.hosts
        self._join_hosts()
        local = xr.addressable_runtime_device_count()
        if t.micro_batch_size % local:
            raise ConfigError(
                "train.micro_batch_size",
                f"{t.micro_batch_size} rows per host do not divide over the host's {local} devices "
                f"(each device takes an equal share of its host's rows); use a multiple of {local}",
            )
        per_micro = t.micro_batch_size * t.seq_len * self.hosts
        if t.global_batch_tokens % per_micro:
            # config.validate sees one data shard for xla_spmd; on a pod every host is one
            raise ConfigError(
                "train.global_batch_tokens",
                f"{t.global_batch_tokens} is not divisible by micro_batch_size x seq_len x hosts = "
                f"{t.micro_batch_size} x {t.seq_len} x {self.hosts} = {per_micro}",
            )
        self.precision = self._resolve_precision(p.mixed_precision)
        self.attn_impl = xla_attention.implementation_for(cfg.model.attention, self.device_type)
        self.attention = f"{self.attn_impl} (model.attention={cfg.model.attention})"
        self.scan_layers = bool(p.scan_layers)
        if self.scan_layers and p.activation_checkpointing == "every_n":
            raise ConfigError(
                "parallel.activation_checkpointing",
                "every_n is not available with parallel.scan_layers (all layers run one program); use full or none",
            )
        spec = ("fsdp", "tensor" if tensor > 1 else None, None, None)
        xla_attention.register(partition_spec=spec)
        # per-host rows over all of the host's devices: torch_xla's minibatch sharding must cover every
        # device along the batch axis (a batch sharded over `fsdp` alone fails its check on a 2-D mesh)
        self.input_sharding = xs.ShardingSpec(self.mesh, (("fsdp", "tensor"), None), minibatch=True)
        self._layouts: Dict[Tuple, List] = {}

    def _join_hosts(self) -> None:
        """The CPU (gloo) process group across hosts: barrier, broadcast_object, any_process and DCP's
        coordination. On a pod, one process per host meets through torch_xla's `xla://` rendezvous (the
        TPU metadata names host 0). One host needs none. The CPU PJRT client has no multi-host runtime
        (process_count() is 1), so processes started with RANK/WORLD_SIZE (torchrun) stand in for hosts:
        each runs its own SPMD program over its own CPU devices, on the same rows (replicas, dp_size 1), and
        the group joins them exactly as it joins the hosts of a pod. That is how the tests run every
        cross-host decision."""
        import torch.distributed as dist

        if not dist.is_initialized():
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if self.hosts > 1:
                import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// init method)

                dist.init_process_group("gloo", init_method="xla://")
            elif launched > 1:
                if self.device_type != "CPU":
                    raise RuntimeError(
                        f"parallel.backend=xla_spmd runs one process per host, but {launched} processes were started "
                        f"on this {self.device_type} host (WORLD_SIZE={launched}); start one (launch/tpu/train.sh does)"
                    )
                dist.init_process_group("gloo")
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1

    # ---------------------------------------------------------------- setup

    def _resolve_precision(self, mixed_precision: str) -> str:
        if mixed_precision == "auto":
            return "bf16" if self.device_type == "TPU" else "fp32"
        return mixed_precision

    def setup_model(self, cfg: DictConfig, init_weights: bool = True) -> nn.Module:
        from torch_xla.distributed.fsdp import checkpoint_module
        from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel as FSDPv2
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from lemur_torch import model as model_lib

        model = model_lib.build_meta_model(cfg.model)
        weights = None
        if init_weights and cfg.model.pretrained:
            from lemur_torch.hf_weights import SafetensorsFolder, pretrained_location
            from lemur_torch.parallel.fsdp import check_pretrained_config

            location = pretrained_location(cfg.model.pretrained)
            check_pretrained_config(location, cfg.model)
            weights = SafetensorsFolder(location)
        self._materialise(model, cfg, init_weights, weights)
        if weights is not None and self.is_main:
            total = sum(int(torch.Size(weights.shape(k)).numel()) for k in weights.keys())
            print(
                f"model.pretrained: host 0 read {weights.bytes_read / 2**30:.2f} GiB of {weights.location} "
                f"({total:,} values in the checkpoint)",
                flush=True,
            )
        model.config._attn_implementation = self.attn_impl
        model.config.use_cache = False
        model.train()

        p = cfg.parallel
        if self.scan_layers:
            partition = _recompute_all_partition if p.activation_checkpointing == "full" else None
            model.model.layers = ScannedLayers(list(model.model.layers), partition, self._shard_activation)
            wrapped = FSDPv2(model, mesh=self.mesh, shard_output=self._shard_output)
        else:

            def checkpointed(layer: nn.Module) -> bool:
                if p.activation_checkpointing == "full":
                    return True
                if p.activation_checkpointing == "every_n":
                    return layer.self_attn.layer_idx % p.ac_every_n == 0
                return False

            def wrap_layer(m: nn.Module, *args, **kwargs) -> nn.Module:
                # checkpoint first, then FSDPv2: the reverse order recurses forever (torch_xla's FSDPv2 docs)
                return FSDPv2(checkpoint_module(m) if checkpointed(m) else m, *args, **kwargs)

            wrapped = FSDPv2(
                model,
                mesh=self.mesh,
                shard_output=self._shard_output,
                auto_wrap_policy=functools.partial(
                    transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}
                ),
                auto_wrapper_callable=wrap_layer,
            )
        if self.precision == "bf16":
            # fp32 master weights and optimizer state; matmuls in bf16 (no loss scaling needed for bf16)
            inner = wrapped.forward

            def forward_bf16(*args, **kwargs):
                with torch.autocast("xla", dtype=torch.bfloat16):
                    return inner(*args, **kwargs)

            wrapped.forward = forward_bf16
        self._torch_xla.sync()
        return wrapped

    def _shard_activation(self, t: torch.Tensor) -> torch.Tensor:
        self._xs.mark_sharding(t, self.mesh, ("fsdp",) + (None,) * (t.dim() - 1))
        return t

    def _shard_output(self, output: Any, mesh) -> None:
        # FSDPv2 passes this to every wrapped layer too: a layer returns a tensor (or a tuple), the root a ModelOutput
        if isinstance(output, torch.Tensor):
            t = output
        elif isinstance(output, tuple):
            t = output[0]
        else:
            t = output.logits
        self._shard_activation(t)

    def _materialise(self, model: nn.Module, cfg: DictConfig, init_weights: bool, weights) -> None:
        """Meta -> sharded XLA parameters, one piece at a time (embeddings, each decoder layer, final norm,
        lm_head), each parameter built from only this host's slices of it (`_from_host_slices`).
        init_weights seeds each parameter by its name, so the values equal the FSDP backend's and the eager
        reference's (each host computes the piece's full values on the CPU, one piece at a time)."""
        from lemur_torch import model as model_lib

        lm = model.model
        pieces = [("model.embed_tokens", lm.embed_tokens)]
        pieces += [(f"model.layers.{i}", layer) for i, layer in enumerate(lm.layers)]
        pieces += [("model.norm", lm.norm)]
        tied = model.config.tie_word_embeddings
        if not tied:
            pieces += [("lm_head", model.lm_head)]
        for prefix, module in pieces:
            if weights is None:
                module.to_empty(device="cpu")
                if init_weights:
                    model_lib.init_weights(_under(prefix, module), cfg.train.seed, cfg.model.initializer_range)
                else:
                    for param in module.parameters():  # the caller loads a checkpoint into the shards
                        param.data.zero_()
            for name, param in list(module.named_parameters()):
                full_name = f"{prefix}.{name}"
                shape = tuple(param.shape)
                if weights is None:
                    values = param.detach()
                    rows = lambda start, stop, values=values: values[start:stop]  # noqa: E731
                else:
                    rows = functools.partial(_pretrained_rows, weights, full_name, shape)
                sharded = self._from_host_slices(shape, self._param_spec(full_name, param), rows)
                _set_parameter(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
            self._torch_xla.sync()
        if tied:
            model.tie_weights()
        model_lib.reset_rope_buffers(model, torch.device("cpu"))
        lm.rotary_emb.to(self.device)

    def _from_host_slices(
        self, shape: Tuple[int, ...], spec: Tuple, rows: Callable[[int, int], torch.Tensor]
    ) -> torch.Tensor:
        """A float32 XLA tensor of `shape` sharded as `spec`, built from this host's slices only: `rows(a, b)`
        gives rows [a, b) of the full tensor (one read covering the rows of every local shard), each local
        device's shard is cut from them and padded as XLA pads uneven shards, and torch_xla assembles the
        global array from the local shards (`_global_tensor_from_cpu_shards`). The local shard boxes depend
        only on (shape, spec): found once per distinct pair (a handful in Llama) from an int8 probe tensor,
        the only time a whole tensor reaches the devices (one byte per value). A spec that leaves the first
        dimension whole is built by rows and resharded on the devices, so a host never reads more than its
        share of any tensor. Every Llama parameter has at least one dimension."""
        sizes = self.mesh.shape()

        def tiles(entry) -> int:
            return math.prod(
                sizes[a] for a in (() if entry is None else entry if isinstance(entry, tuple) else (entry,))
            )

        axes = [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
        even = all(n % tiles(e) == 0 for n, e in zip(shape, spec)) and shape[0] % tiles(tuple(axes)) == 0
        # (an uneven tensor computed on the devices comes back replicated: those are read whole instead)
        if spec[0] is None and axes and even:
            # sharded along a later dimension only (FSDPv2 shards the largest: k/v and down projections): a
            # host's columns are not contiguous bytes, so read rows instead (sharded over the same devices
            # along the first dimension) and let one on-device program move them into `spec` (an all-to-all)
            by_rows = self._from_host_slices(
                shape, (tuple(axes) if len(axes) > 1 else axes[0],) + (None,) * (len(shape) - 1), rows
            )
            out = self._xs.annotate_custom_sharding(by_rows.clone(), self.mesh, spec)
            return out.global_tensor if hasattr(out, "global_tensor") else out
        key = (shape, spec)
        if key not in self._layouts:
            import torch_xla.core.xla_model as xm

            # moved whole, then resharded in place: the one path torch_xla gets right for every shape here
            # (send_cpu_data_to_device fails on 1-D tensors over a 2-D mesh; a tensor computed on the device
            # comes back replicated when its dimension does not divide evenly)
            probe = torch.zeros(shape, dtype=torch.int8).to(self.device)
            self._xs.mark_sharding(probe, self.mesh, spec)
            self._torch_xla.sync()
            xm.wait_device_ops()
            boxes = [idx for _, idx in self._torch_xla._XLAC._get_local_shard_replica_and_indices([probe])[0]]
            padded = tuple(math.ceil(n / tiles(e)) for n, e in zip(shape, spec))
            self._layouts[key] = [boxes, padded]
        boxes, padded = self._layouts[key]
        full = [slice(0, n) for n in shape]
        boxes = [full if b is Ellipsis else list(b) for b in boxes]
        start, stop = min(b[0].start for b in boxes), max(b[0].stop for b in boxes)
        block = rows(start, stop).to(torch.float32)
        shards = []
        for box in boxes:
            part = block[(slice(box[0].start - start, box[0].stop - start), *box[1:])]
            if tuple(part.shape) != padded:
                part = torch.nn.functional.pad(
                    part, [x for d in reversed(range(len(padded))) for x in (0, padded[d] - part.shape[d])]
                )
            shards.append(part.contiguous())
        return self._torch_xla._XLAC._global_tensor_from_cpu_shards(
            shards, self.mesh.get_op_sharding(spec), list(shape)
        )

    def _param_spec(self, name: str, param: torch.Tensor) -> Tuple:
        """FSDPv2's own rule (the largest dimension over `fsdp`), or with a tensor axis Megatron-style splits:
        q/k/v/gate/up by output features, o/down by input features, the other dimension over `fsdp`."""
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import _prepare_spmd_partition_spec

        if self.tensor_size > 1 and param.dim() == 2:
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                return ("tensor", "fsdp")
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                return ("fsdp", "tensor")
        return _prepare_spmd_partition_spec(param, shard_maximal=True)

    # ---------------------------------------------------------------- steps

    def device_batches(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
        import torch_xla.core.xla_model as xm

        for batch in batches:
            yield xm.send_cpu_data_to_device(batch, self.device, input_sharding=self.input_sharding)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # the batch is one global array: a sum over it is already global

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        # stays on the device: no host sync, so clipping is part of the step's one graph
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # torch_xla patches it; no foreach

    def optimizer_step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
        """optimizer.step() kept only where `finite` (a 0-d bool tensor) holds, decided on the device: reading
        the guard on the host would cut the step into two graphs. The select fuses into AdamW's elementwise
        update, so it costs no memory. A skipped step leaves weights and moments as they were; only AdamW's
        host-side step counter still advances (bias correction, ~1 after warmup)."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]

        def tensors(p):
            return {
                k: v
                for k, v in optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor) and v.device == p.device
            }

        before = {p: (p.detach().clone(), {k: v.clone() for k, v in tensors(p).items()}) for p in params}
        optimizer.step()
        with torch.no_grad():
            for p, (old, old_state) in before.items():
                p.copy_(torch.where(finite, p, old))
                for k, v in tensors(p).items():
                    v.copy_(torch.where(finite, v, old_state[k] if k in old_state else torch.zeros_like(v)))

    def step_done(self) -> None:
        self._torch_xla.sync()

    def eval_step_done(self) -> None:
        self._torch_xla.sync()

    # ---------------------------------------------------------------- checkpoints

    def _named_params(self, model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        from lemur_torch.model import clean_fqn

        return [(clean_fqn(n), p) for n, p in model.named_parameters()]

    def state_dict_for_checkpoint(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
        """{'model': {hf_name: param}, 'optim': get_optimizer_state_dict's layout} over the live XLA tensors,
        so DCP writes from and loads into the shards in place."""
        import torch_xla.core.xla_model as xm

        self._torch_xla.sync()
        xm.wait_device_ops()  # a save racing an in-flight execution fails in PJRT (torch_xla #7935)
        named = self._named_params(model)
        state: Dict[str, Any] = {"model": dict(named)}
        if optimizer is None:
            return state
        if not optimizer.state:
            self._prime_optimizer(optimizer)
        fqn = {id(p): n for n, p in named}
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [fqn[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        state["optim"] = {"state": {fqn[id(p)]: s for p, s in optimizer.state.items()}, "param_groups": groups}
        return state

    def _prime_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Create the optimizer state so DCP can load into it in place. torch_xla's prime_optimizer takes one
        zero-gradient step, which moves the weights (decay) and the hyperparameters' bookkeeping: this is only
        called before a load, which overwrites all of it."""
        from torch_xla.experimental.distributed_checkpoint import prime_optimizer

        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        prime_optimizer(optimizer)
        for g, h in zip(optimizer.param_groups, hyper):
            g.update(h)
        optimizer.zero_grad(set_to_none=True)

    def load_state_dict_from_checkpoint(
        self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], state: Dict[str, Any]
    ) -> None:
        # DCP's SPMD planner loads into the XLA tensors in place; copy only where it replaced an entry
        named = dict(self._named_params(model))
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
        self._torch_xla.sync()

    def dcp_save(self, state: Dict[str, Any], path: str) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla.core.xla_model as xm

        self._torch_xla.sync()
        xm.wait_device_ops()
        # per_thread_copy_ahead=0: DCP's overlapping loader serves CUDA streams; with torchax imported (scan,
        # Pallas) it takes torchax's `jax` device module for one and fails
        writer = dcp.FileSystemWriter(path, per_thread_copy_ahead=0)
        dcp.save(state, storage_writer=writer, planner=_spmd_save_planner())

    def dcp_load(self, state: Dict[str, Any], path: str) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla.core.xla_model as xm
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        self._torch_xla.sync()
        xm.wait_device_ops()
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=SPMDLoadPlanner())
        self._torch_xla.sync()

    def export_hf(
        self, model: nn.Module, out_dir: str, max_shard_size_mb: int, dtype: torch.dtype = torch.float32
    ) -> None:
        """HF safetensors shards + index, through DCP: the weights are saved as a DCP checkpoint (each host
        writes its own shards, moved to the host as they are), then output file i is assembled by process
        i mod world_size from that checkpoint, one file at a time. Nothing is compiled (moving a sharded
        tensor to the host with .cpu() compiles and runs one replication program per tensor) and no host
        holds more than one output file. With several hosts `out_dir` must be on storage they all see, like
        checkpoint.dir."""
        import shutil

        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file

        from lemur_torch.parallel.fsdp import shard_files_by_size

        named = self._named_params(model)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            named = [(n, p) for n, p in named if n != "lm_head.weight"]
        staging = os.path.join(out_dir, ".dcp-weights")
        self.dcp_save(dict(named), staging)
        self.barrier()
        sizes = {n: torch.empty(p.shape, dtype=dtype, device="meta") for n, p in named}
        mapping = shard_files_by_size(sizes, max_shard_size_mb)
        count = max(mapping.values())
        fname = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
        for i in range(1, count + 1):
            if (i - 1) % self.world_size != self.rank:
                continue
            tensors = {n: torch.empty(sizes[n].shape, dtype=torch.float32) for n in mapping if mapping[n] == i}
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(staging), no_dist=True)
            save_file(
                {n: t.to(dtype) for n, t in tensors.items()}, os.path.join(out_dir, fname[i]), metadata={"format": "pt"}
            )
            del tensors
        self.barrier()
        if self.is_main:
            total = sum(t.numel() * t.element_size() for t in sizes.values())
            weight_map = {n: fname[i] for n, i in mapping.items()}
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()

    # ---------------------------------------------------------------- misc

    def barrier(self) -> None:
        """An all-reduce of one value over the hosts' gloo group. Not dist.barrier(): once torchax is imported
        (torch_xla's mark_sharding imports it whenever it is installed, as with the tpu extra) it registers
        a `jax` device module that claims to be available, dist.barrier() picks that as the accelerator for
        its tensor, and fails ("Please register PrivateUse1HooksInterface")."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(torch.zeros(1))

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def memory_stats(self) -> Dict[str, float]:
        """Device memory of this host's first device (PJRT's allocator stats; TPU), in the FSDP backend's
        keys: mem_alloc_gib is the peak allocated. The CPU client keeps none."""
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(self.device)
        except Exception:  # noqa: BLE001  (the CPU client has no memory info)
            return {}
        out = {}
        for key, name in (
            ("peak_bytes_used", "mem_alloc_gib"),
            ("bytes_used", "mem_in_use_gib"),
            ("bytes_limit", "mem_limit_gib"),
        ):
            if info.get(key):
                out[name] = info[key] / 2**30
        return out

    def shutdown(self) -> None:
        import torch.distributed as dist
        import torch_xla.core.xla_model as xm

        self._torch_xla.sync()
        xm.wait_device_ops()
        if dist.is_initialized():
            dist.destroy_process_group()


# TPU VM accelerator types (the part before "-<chips>") -> PJRT's device kind, the key of metrics.PEAK_FLOPS
_TPU_KINDS = {"v4": "TPU v4", "v5litepod": "TPU v5 lite", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def _pjrt_device_kind(device_type: str) -> str:
    """PJRT's own name for the chip, looked up in metrics.PEAK_FLOPS for MFU: "TPU v4", "TPU v5 lite" (v5e),
    "TPU v5" (v5p), "TPU v6 lite" (v6e). torch_xla cannot ask PJRT under SPMD (the virtual SPMD device has
    no kind, and asking a real device before use_spmd() leaves the SPMD runtime crashing at the first
    step), so on TPU it comes from the VM's accelerator type in the TPU metadata (e.g. v5litepod-256)."""
    if device_type != "TPU":
        return (device_type or "unknown").lower()
    from torch_xla._internal import tpu

    try:
        accelerator = tpu.get_tpu_type()
    except Exception:  # noqa: BLE001  (no metadata server: MFU needs log.peak_flops then)
        return "TPU"
    return _TPU_KINDS.get(accelerator, f"TPU {accelerator}")


def _spmd_save_planner():
    """torch_xla's SPMDSavePlanner, writing every chunk exactly once. Its global dedup (`dedup_tensors` in
    torch_xla 2.9) keys write items by (name, offset) and drops a key from every plan after the first one
    holding it, counting each occurrence: a chunk held twice by the same host (a tensor sharded over fsdp
    and replicated over tensor on an fsdp x tensor mesh: norms, embeddings, lm_head and their Adam
    moments) was dropped from that host's own plan too, so the tensor vanished from the checkpoint. Keeping
    the first copy on each host before the global dedup leaves one writer per chunk."""
    from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

    class _SpmdSavePlanner(SPMDSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            seen, items = set(), []
            for item in plan.items:
                key = (item.index.fqn, item.index.offset)
                if key not in seen:
                    seen.add(key)
                    items.append(item)
            return dataclasses.replace(plan, items=items)

    return _SpmdSavePlanner()


def _under(prefix: str, module: nn.Module) -> nn.Module:
    """A throwaway root holding `module` at `prefix`, so its parameters carry their full model names."""
    root = parent = nn.Module()
    *path, last = prefix.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(last, module)
    return root


def _set_parameter(module: nn.Module, name: str, param: nn.Parameter) -> None:
    *path, last = name.split(".")
    for part in path:
        module = getattr(module, part)
    setattr(module, last, param)


def _pretrained_rows(weights, name: str, shape: Tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the pretrained tensor `name` for a parameter of `shape`."""
    stored = tuple(weights.shape(name))
    if stored == shape:
        return weights.rows(name, start, stop)
    if name in ("model.embed_tokens.weight", "lm_head.weight") and stored[1:] == shape[1:] and stored[0] < shape[0]:
        # a smaller vocabulary (Llama-2's 32000 under the chat stage's padded 32064): new rows start at the
        # mean of the existing ones, as in the FSDP backend; the mean needs the whole (one) tensor
        full = weights.rows(name).float()
        full = torch.cat([full, full.mean(0, keepdim=True).expand(shape[0] - stored[0], -1)])
        return full[start:stop]
    raise ValueError(
        f"model.pretrained={weights.location}: {name} has shape {list(stored)}, the model expects {list(shape)}"
    )


class ScannedLayers(nn.ModuleList):
    """The decoder layers run as one torch_xla scan (`torch_xla.experimental.scan`): one layer's forward and
    backward are traced and compiled once and looped over the layers' stacked weights in an XLA While, so
    trace and compile time do not grow with depth. Still a ModuleList holding the same layers, so parameter
    names, checkpoints and exports are unchanged; only the slice that HF's LlamaModel.forward iterates over
    (`self.layers[: num_hidden_layers]`) is one callable running the scan.

    The carry is (hidden states, cos, sin, positions as float; scan differentiates its whole carry, and
    integer tensors have no gradient). `partition` is the AOTAutograd partitioner that decides what the
    backward recomputes: None keeps every activation, _recompute_all_partition is activation checkpointing
    (only each layer's input is kept)."""

    def __init__(
        self, layers: List[nn.Module], partition: Optional[Callable], shard: Callable[[torch.Tensor], torch.Tensor]
    ):
        super().__init__(layers)
        self._partition = partition
        self._shard = shard

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [functools.partial(self._run, list(self._modules.values())[idx])]
        return super().__getitem__(idx)

    def _run(
        self,
        layers: List[nn.Module],
        hidden_states: torch.Tensor,
        position_embeddings=None,
        position_ids=None,
        **kwargs,
    ):
        from functorch.compile import default_partition
        from torch_xla.experimental.scan import scan

        if kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError(
                "parallel.scan_layers runs mask-free training forwards only (no attention_mask, no KV cache)"
            )
        template = layers[0]
        names = [n for n, _ in template.named_parameters()]
        stacked = {n: torch.stack([layer.get_parameter(n) for layer in layers]) for n in names}
        cos, sin = position_embeddings

        def one_layer(carry, params):
            h, cos, sin, pos = carry
            out = torch.func.functional_call(
                template,
                params,
                (h,),
                {"position_embeddings": (cos, sin), "position_ids": pos.long(), "attention_mask": None},
            )
            return (out, cos, sin, pos), None

        # sharding annotations cannot go inside the traced body (AOTAutograd's tensors are not XLA tensors):
        # the carry is sharded over fsdp going in and coming out, and SPMD propagates it through the loop
        carry = (self._shard(hidden_states), cos, sin, position_ids.float())
        (hidden_states, _, _, _), _ = scan(one_layer, carry, stacked, partition_fn=self._partition or default_partition)
        return self._shard(hidden_states)


def _recompute_all_partition(joint_module, joint_inputs, *, num_fwd_outputs, **kwargs):
    """Activation checkpointing for the scanned layer, as torch.utils.checkpoint does it: every operation of
    the layer is recomputed in the backward pass, so only the layer's input is saved per layer. Marks each
    node must-recompute, then lets functorch's min-cut partitioner split forward and backward."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch.utils.checkpoint import CheckpointPolicy

    for node in joint_module.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = 0
    return min_cut_rematerialization_partition(joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
