"""torch_xla SPMD backend: FSDPv2 (`SpmdFullyShardedDataParallel`) over a (fsdp, tensor) device mesh.

One process per host drives every local device; SPMD turns the single-device program into a sharded one.
Runs on TPU pods (PJRT_DEVICE=TPU) and, for tests, on the CPU PJRT device with CPU_NUM_DEVICES virtual
devices. What it owns, and why it looks the way it does:

- Mesh: (fsdp, tensor) over `xr.global_runtime_device_count()` devices; `parallel.xla_tensor` sizes the
  tensor axis (1 = pure FSDP, the fastest choice whenever the model fits). With tensor > 1 the attention and
  MLP projections are split Megatron-style over `tensor` before FSDPv2 shards the rest over `fsdp`.
- Model: built on the meta device by lemur_torch.model, then materialised one piece at a time (embeddings,
  each decoder layer, norm, lm_head): host init (per-parameter name-seeded, so the values equal the FSDP
  backend's) or the pretrained safetensors, moved to the devices and sharded at once, so no host or device
  ever holds more than one unsharded layer. FSDPv2 then wraps each decoder layer with activation
  checkpointing inside the wrap (`auto_wrapper_callable`), the only order that works with FSDPv2.
- Attention: mask-free implementations from xla_attention (per-document masks from position_ids on the
  device), so a training step is one graph. HF's SDPA path would sync with the host to detect packing.
- Batches: sent synchronously with `send_cpu_data_to_device` and sharded along `fsdp`. No MpDeviceLoader:
  its prefetch thread would run the stateful loader ahead of the step, so a checkpoint would record a
  loader position past the batches actually trained on and resume would skip data.
- Steps: nothing here syncs with the host; `step_done` cuts and runs the step's one graph.
- Checkpoints: torch.distributed.checkpoint with torch_xla's SPMD planners, keys exactly those of the HF
  model (FSDPv2's `_orig_module.` segments stripped) and the optimizer state keyed by the same names
  (the layout of torch.distributed.checkpoint.state_dict.get_optimizer_state_dict), so a checkpoint written
  here is read by the FSDP backend and by lemur-export in a plain torch environment, and vice versa.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from lemur_torch.config import ConfigError
from lemur_torch.parallel import xla_attention
from lemur_torch.parallel.base import Backend


class XlaSpmdBackend(Backend):
    name = "xla_spmd"

    def __init__(self, cfg: DictConfig):
        import torch.distributed as dist
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        self._torch_xla, self._xs, self._xr = torch_xla, xs, xr
        xr.use_spmd()  # before any XLA tensor exists; process-global
        n = xr.global_runtime_device_count()
        tensor = int(cfg.parallel.xla_tensor)
        if tensor < 1 or n % tensor:
            raise ConfigError("parallel.xla_tensor", f"{tensor} does not divide the {n} devices")
        self.mesh = xs.Mesh(np.arange(n), (n // tensor, tensor), ("fsdp", "tensor"))
        xs.set_global_mesh(self.mesh)
        self.fsdp_size, self.tensor_size = n // tensor, tensor

        self.device = torch_xla.device()
        self.device_type = xr.device_type()
        self.rank, self.world_size = xr.process_index(), xr.process_count()
        # each host reads its own share; SPMD stitches the host batches into one global array
        self.dp_rank, self.dp_size = self.rank, self.world_size
        self.num_devices = n
        self.device_kind = self._device_kind()
        t = cfg.train
        global_micro = t.micro_batch_size * self.world_size
        if global_micro % self.fsdp_size:
            raise ConfigError(
                "train.micro_batch_size",
                f"the global micro-batch ({t.micro_batch_size} x {self.world_size} hosts = {global_micro} rows) "
                f"must divide by the fsdp axis ({self.fsdp_size} devices)",
            )
        per_micro = t.micro_batch_size * t.seq_len * self.world_size
        if t.global_batch_tokens % per_micro:
            # config.validate sees one data shard for xla_spmd; on a pod every host is one
            raise ConfigError(
                "train.global_batch_tokens",
                f"{t.global_batch_tokens} is not divisible by micro_batch_size x seq_len x hosts = "
                f"{t.micro_batch_size} x {t.seq_len} x {self.world_size} = {per_micro}",
            )
        self.precision = self._resolve_precision(cfg.parallel.mixed_precision)
        self.attn_impl = xla_attention.implementation_for(cfg.model.attention, self.device_type)
        self.attention = f"{self.attn_impl} (model.attention={cfg.model.attention})"
        spec = ("fsdp", "tensor" if tensor > 1 else None, None, None)
        xla_attention.register(partition_spec=spec)
        self.input_sharding = xs.ShardingSpec(self.mesh, ("fsdp", None), minibatch=self.world_size > 1)
        # A CPU process group for DCP's coordination and for barrier/broadcast across hosts. One host needs
        # none (DCP runs without one), which also keeps the CPU test lane free of rendezvous.
        if self.world_size > 1 and not dist.is_initialized():
            import torch_xla.distributed.xla_backend  # noqa: F401  (registers the xla:// init method)

            dist.init_process_group("gloo", init_method="xla://")

    # ---------------------------------------------------------------- setup

    def _device_kind(self) -> str:
        """PJRT's own name for the chip ("TPU v4", "TPU v5 lite", ...), looked up in metrics.PEAK_FLOPS."""
        import torch_xla.core.xla_model as xm

        try:
            return xm.xla_device_kind(self.device)
        except Exception:  # noqa: BLE001  (only used for MFU)
            return self.device_type

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
            from lemur_torch.parallel.fsdp import check_pretrained_config, resolve_pretrained

            path = resolve_pretrained(cfg.model.pretrained)
            check_pretrained_config(path, cfg.model)
            weights = HFWeights(path)
        self._materialise(model, cfg, init_weights, weights)
        model.config._attn_implementation = self.attn_impl
        model.config.use_cache = False
        model.train()

        p = cfg.parallel

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
            auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}),
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

    def _shard_output(self, output: Any, mesh) -> None:
        # FSDPv2 passes this to every wrapped layer too: a layer returns a tensor (or a tuple), the root a ModelOutput
        if isinstance(output, torch.Tensor):
            t = output
        elif isinstance(output, tuple):
            t = output[0]
        else:
            t = output.logits
        self._xs.mark_sharding(t, mesh, ("fsdp",) + (None,) * (t.dim() - 1))

    def _materialise(self, model: nn.Module, cfg: DictConfig, init_weights: bool, weights: Optional["HFWeights"]) -> None:
        """Meta -> host -> devices one piece at a time (embeddings, each decoder layer, final norm, lm_head),
        every parameter sharded as soon as it lands: neither the host nor a device holds more than one
        unsharded layer (Llama-2-70B in fp32 is 280 GB, more than a TPU VM host's memory). init_weights seeds
        each parameter by its name, so the values equal the FSDP backend's and the eager reference's."""
        from lemur_torch import model as model_lib

        lm = model.model
        pieces = [("model.embed_tokens", lm.embed_tokens)]
        pieces += [(f"model.layers.{i}", layer) for i, layer in enumerate(lm.layers)]
        pieces += [("model.norm", lm.norm)]
        tied = model.config.tie_word_embeddings
        if not tied:
            pieces += [("lm_head", model.lm_head)]
        for prefix, module in pieces:
            module.to_empty(device="cpu")
            if weights is not None:
                weights.fill_(module, prefix)
            elif init_weights:
                model_lib.init_weights(_under(prefix, module), cfg.train.seed, cfg.model.initializer_range)
            module.to(self.device)
            for name, param in module.named_parameters():
                self._xs.mark_sharding(param, self.mesh, self._param_spec(f"{prefix}.{name}", param))
            self._torch_xla.sync()
        if tied:
            model.tie_weights()
        model_lib.reset_rope_buffers(model, torch.device("cpu"))
        lm.rotary_emb.to(self.device)

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
            return {k: v for k, v in optimizer.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.device == p.device}

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
        from torch_xla.experimental.distributed_checkpoint import SPMDSavePlanner

        self._torch_xla.sync()
        xm.wait_device_ops()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path), planner=SPMDSavePlanner())

    def dcp_load(self, state: Dict[str, Any], path: str) -> None:
        import torch.distributed.checkpoint as dcp
        import torch_xla.core.xla_model as xm
        from torch_xla.experimental.distributed_checkpoint import SPMDLoadPlanner

        self._torch_xla.sync()
        xm.wait_device_ops()
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), planner=SPMDLoadPlanner())
        self._torch_xla.sync()

    def export_hf(self, model: nn.Module, out_dir: str, max_shard_size_mb: int, dtype: torch.dtype = torch.float32) -> None:
        """HF safetensors shards + index. Every host takes part in each tensor's gather (a sharded array's
        transfer to the host is collective); only host 0 writes, one shard of at most max_shard_size_mb
        on the host at a time."""
        from safetensors.torch import save_file

        named = self._named_params(model)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            named = [(n, p) for n, p in named if n != "lm_head.weight"]
        limit = max_shard_size_mb * 1024 * 1024
        shards: List[List[Tuple[str, nn.Parameter]]] = [[]]
        size = 0
        for n, p in named:
            nbytes = p.numel() * dtype.itemsize
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((n, p))
            size += nbytes
        self._torch_xla.sync()
        if self.is_main:
            os.makedirs(out_dir, exist_ok=True)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: p.detach().cpu().to(dtype).contiguous() for n, p in shard}
            if self.is_main:
                save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
            for n, t in tensors.items():
                weight_map[n] = fname
                total += t.numel() * t.element_size()
            del tensors
        if self.is_main:
            with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        self.barrier()

    # ---------------------------------------------------------------- misc

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def memory_stats(self) -> Dict[str, float]:
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(self.device)
        except Exception:  # noqa: BLE001  (the CPU client has no memory info)
            return {}
        used = info.get("bytes_used", info.get("kb_total", 0))
        return {"device_mem_gb": used / 2**30} if used else {}

    def shutdown(self) -> None:
        import torch.distributed as dist

        import torch_xla.core.xla_model as xm

        self._torch_xla.sync()
        xm.wait_device_ops()
        if dist.is_initialized():
            dist.destroy_process_group()


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


class HFWeights:
    """Tensors of an HF safetensors checkpoint folder, read one by one by name."""

    def __init__(self, folder: str):
        import glob

        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"model.pretrained: no *.safetensors in {folder}")
        self.folder = folder
        self._open = [safe_open(f, framework="pt") for f in files]
        self._where = {k: h for h in self._open for k in h.keys()}

    @torch.no_grad()
    def fill_(self, module: nn.Module, prefix: str) -> None:
        for name, param in module.named_parameters():
            key = f"{prefix}.{name}"
            if key not in self._where:
                raise KeyError(f"model.pretrained={self.folder} has no tensor {key!r}")
            value = self._where[key].get_tensor(key)
            if key in ("model.embed_tokens.weight", "lm_head.weight") and value.shape[0] < param.shape[0]:
                # a smaller vocabulary (Llama-2's 32000 under the chat stage's padded 32064): new rows start
                # at the mean of the existing ones, as in the FSDP backend
                extra = value.float().mean(0, keepdim=True).expand(param.shape[0] - value.shape[0], -1)
                value = torch.cat([value.float(), extra])
            param.copy_(value)
