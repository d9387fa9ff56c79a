"""XlaSpmdBackend: the torch_xla SPMD backend's process, mesh, model wrapping and step operations (see the
package's docstring for the whole design). The only module of the package that needs torch_xla to import,
with the ones it uses (materialise, scan, checkpoint); lemur_torch.parallel.build_backend imports it only when
the config names this backend.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from omegaconf import DictConfig
from torch import nn
from torch_xla.distributed.fsdp import checkpoint_module
from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel as FSDPv2
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lemur_torch.model import build_meta_model
from lemur_torch.parallel.base import Backend
from lemur_torch.parallel.process_group import init_process_group
from lemur_torch.parallel.xla import attention, checkpoint, rules, tpu
from lemur_torch.parallel.xla.materialise import HostShards
from lemur_torch.parallel.xla.scan import ScannedLayers, recompute_all_partition
from lemur_torch.weights import SafetensorsFolder, check_pretrained_config, pretrained_location


class XlaSpmdBackend(Backend):
    name = "xla_spmd"

    def __init__(self, cfg: DictConfig):
        p = cfg.parallel
        rules.check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if p.xla_cache_dir:
            # before the runtime compiles anything; per host (each host compiles the same programs)
            os.makedirs(p.xla_cache_dir, exist_ok=True)
            xr.initialize_cache(p.xla_cache_dir, readonly=False)
        xr.use_spmd()  # before any XLA tensor exists; process-global
        n = xr.global_runtime_device_count()
        # each host reads its own share of the data; SPMD stitches the host batches into one global array
        self.hosts = xr.process_count()
        rules.check_mesh(cfg, n, xr.addressable_runtime_device_count(), self.hosts)
        tensor = p.xla_tensor
        self.mesh = xs.Mesh(np.arange(n), (n // tensor, tensor), ("fsdp", "tensor"))
        xs.set_global_mesh(self.mesh)
        self.fsdp_size, self.tensor_size = n // tensor, tensor

        self.device = torch_xla.device()
        self.device_type = xr.device_type()
        self.device_kind = tpu.pjrt_device_kind(self.device_type)
        self.num_devices = n
        self.dp_rank, self.dp_size = xr.process_index(), self.hosts
        self._join_hosts()
        self.precision = rules.precision(cfg, self.device_type)
        self.attn_impl = attention.implementation_for(cfg.model.attention, self.device_type)
        self.attention = f"{self.attn_impl} (model.attention={cfg.model.attention})"
        self.scan_layers = p.scan_layers
        attention.register(partition_spec=("fsdp", "tensor" if tensor > 1 else None, None, None))
        # per-host rows over all of the host's devices: torch_xla's minibatch sharding must cover every
        # device along the batch axis (a batch sharded over `fsdp` alone fails its check on a 2-D mesh)
        self.input_sharding = xs.ShardingSpec(self.mesh, (("fsdp", "tensor"), None), minibatch=True)
        self.shards = HostShards(self.mesh, self.device, tensor)

    def _join_hosts(self) -> None:
        """The CPU (gloo) process group across hosts: barrier, broadcast_object, any_process and DCP's
        coordination. On a pod, one process per host meets through torch_xla's `xla://` rendezvous (the
        TPU metadata names host 0). One host needs none. The CPU PJRT client has no multi-host runtime
        (process_count() is 1), so processes started with RANK/WORLD_SIZE (torchrun) stand in for hosts:
        each runs its own SPMD program over its own CPU devices, on the same rows (replicas, dp_size 1), and
        the group joins them exactly as it joins the hosts of a pod. That is how the tests run every
        cross-host decision."""
        if not dist.is_initialized():
            launched = int(os.environ.get("WORLD_SIZE", "1"))
            if self.hosts > 1:
                # registers the xla:// init method, and also an `xla` process-group backend as the default
                # for XLA tensors: only where a pod needs the rendezvous
                import torch_xla.distributed.xla_backend  # noqa: F401

                init_process_group("cpu", init_method="xla://")
            elif launched > 1:
                if self.device_type != "CPU":
                    raise RuntimeError(
                        f"parallel.backend=xla_spmd runs one process per host, but {launched} processes were started "
                        f"on this {self.device_type} host (WORLD_SIZE={launched}); start one (launch/tpu/train.sh does)"
                    )
                init_process_group("cpu")
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world_size = 0, 1

    # ---------------------------------------------------------------- setup

    def setup_model(self, cfg: DictConfig, init_weights: bool = True) -> nn.Module:
        model = build_meta_model(cfg.model)
        weights: Optional[SafetensorsFolder] = None
        if init_weights and cfg.model.pretrained:
            location = pretrained_location(cfg.model.pretrained)
            check_pretrained_config(location, cfg.model)
            weights = SafetensorsFolder(location)
        self.shards.materialise(model, cfg, init_weights, weights)
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
            partition = recompute_all_partition if p.activation_checkpointing == "full" else None
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
        torch_xla.sync()
        return wrapped

    def _shard_activation(self, t: torch.Tensor) -> torch.Tensor:
        xs.mark_sharding(t, self.mesh, ("fsdp",) + (None,) * (t.dim() - 1))
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

    # ---------------------------------------------------------------- steps

    def device_batches(self, batches: Iterator[Dict[str, torch.Tensor]]) -> Iterator[Dict[str, torch.Tensor]]:
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
        update, so it costs no memory. A skipped step leaves weights, moments and AdamW's step count (a device
        tensor: the optimizer is capturable, lemur_torch.optim.build_optimizer) as they were."""
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
        torch_xla.sync()

    def replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        # a tensor moved in has no sharding ('' in its spec); the step returns it '{replicated}': a program of its
        # own for the first step, unless marked as the step returns it
        on_device = tensor.to(self.device)
        xs.mark_sharding(on_device, self.mesh, (None,) * on_device.dim())
        return on_device

    def eval_step_done(self) -> None:
        torch_xla.sync()

    # ---------------------------------------------------------------- checkpoints (checkpoint.py)

    def state_dict_for_checkpoint(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Dict[str, Any]:
        return checkpoint.state_dict(model, optimizer)

    def load_state_dict_from_checkpoint(
        self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], state: Dict[str, Any]
    ) -> None:
        checkpoint.load_state_dict(model, optimizer, state)

    def dcp_save(self, state: Dict[str, Any], path: str) -> None:
        checkpoint.save(state, path)

    def dcp_load(self, state: Dict[str, Any], path: str) -> None:
        checkpoint.load(state, path)

    def export_hf(
        self, model: nn.Module, out_dir: str, max_shard_size_mb: int, dtype: torch.dtype = torch.float32
    ) -> None:
        checkpoint.export_hf(model, out_dir, max_shard_size_mb, dtype, self.rank, self.world_size, self.barrier)

    # ---------------------------------------------------------------- misc

    def barrier(self) -> None:
        """An all-reduce of one value over the hosts' gloo group. Not dist.barrier(): once torchax is imported
        (torch_xla's mark_sharding imports it whenever it is installed, as with the tpu extra) it registers
        a `jax` device module that claims to be available, dist.barrier() picks that as the accelerator for
        its tensor, and fails ("Please register PrivateUse1HooksInterface")."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(torch.zeros(1))

    def broadcast_object(self, obj: Any) -> Any:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def memory_stats(self) -> Dict[str, float]:
        """Device memory of this host's first device (PJRT's allocator stats; TPU), in the FSDP backend's
        keys: mem_alloc_gib is the peak allocated. The CPU client keeps none."""
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
        """Wait for the device, then leave the hosts' group. Called from lemur-train's `finally`: while an
        exception propagates, the pending graph may be half traced (the error came from inside a step's
        forward or backward), and executing it crashes the process (a segfault in place of the error). A run
        that ended in an exception has nothing on the device to wait for (a checkpoint waits for its own
        device work), so only a clean end flushes."""
        if sys.exc_info()[0] is None:
            torch_xla.sync()
            xm.wait_device_ops()
        if dist.is_initialized():
            dist.destroy_process_group()
