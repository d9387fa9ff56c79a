"""Meta -> sharded XLA parameters, built on each host from only the slices its own devices hold.

Each host computes (name-seeded init, lemur_torch.model.init_weights: the FSDP backend's values) or reads (HF
safetensors by byte range, lemur_torch.weights) the rows of each parameter that cover its local shards, cuts
each local device's shard from them, and torch_xla assembles the global array from the local shards. So no
host reads the whole model and no device holds an unsharded tensor.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.distributed.spmd as xs
from omegaconf import DictConfig
from torch import nn
from torch_xla.experimental.spmd_fully_sharded_data_parallel import _prepare_spmd_partition_spec

from lemur_torch.model import init_weights as init_model_weights
from lemur_torch.model import reset_rope_buffers
from lemur_torch.weights import VOCAB_KEYS, SafetensorsFolder, pad_vocab_rows


class HostShards:
    """Sharded parameters of the `mesh` on `device`, from this host's slices; `tensor_size` > 1 splits the
    projections Megatron-style over the mesh's `tensor` axis."""

    def __init__(self, mesh: xs.Mesh, device: torch.device, tensor_size: int):
        self.mesh, self.device, self.tensor_size = mesh, device, tensor_size
        # (shape, spec) -> [this host's shard boxes, padded shard shape]: found once per distinct pair
        self._layouts: Dict[Tuple, List] = {}

    def materialise(
        self, model: nn.Module, cfg: DictConfig, init_weights: bool, weights: Optional[SafetensorsFolder]
    ) -> None:
        """Meta -> sharded XLA parameters, one piece at a time (embeddings, each decoder layer, final norm,
        lm_head), each parameter built from only this host's slices of it (`from_host_slices`).
        init_weights seeds each parameter by its name, so the values equal the FSDP backend's and the eager
        reference's (each host computes the piece's full values on the CPU, one piece at a time)."""
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
                    init_model_weights(_under(prefix, module), cfg.train.seed, cfg.model.initializer_range)
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
                    rows = functools.partial(pretrained_rows, weights, full_name, shape)
                sharded = self.from_host_slices(shape, self.param_spec(full_name, param), rows)
                _set_parameter(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
            torch_xla.sync()
        if tied:
            model.tie_weights()
        reset_rope_buffers(model, torch.device("cpu"))
        lm.rotary_emb.to(self.device)

    def from_host_slices(
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
            by_rows = self.from_host_slices(
                shape, (tuple(axes) if len(axes) > 1 else axes[0],) + (None,) * (len(shape) - 1), rows
            )
            out = xs.annotate_custom_sharding(by_rows.clone(), self.mesh, spec)
            return out.global_tensor if hasattr(out, "global_tensor") else out
        key = (shape, spec)
        if key not in self._layouts:
            # moved whole, then resharded in place: the one path torch_xla gets right for every shape here
            # (send_cpu_data_to_device fails on 1-D tensors over a 2-D mesh; a tensor computed on the device
            # comes back replicated when its dimension does not divide evenly)
            probe = torch.zeros(shape, dtype=torch.int8).to(self.device)
            xs.mark_sharding(probe, self.mesh, spec)
            torch_xla.sync()
            xm.wait_device_ops()
            boxes = [idx for _, idx in torch_xla._XLAC._get_local_shard_replica_and_indices([probe])[0]]
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
        return torch_xla._XLAC._global_tensor_from_cpu_shards(shards, self.mesh.get_op_sharding(spec), list(shape))

    def param_spec(self, name: str, param: torch.Tensor) -> Tuple:
        """FSDPv2's own rule (the largest dimension over `fsdp`), or with a tensor axis Megatron-style splits:
        q/k/v/gate/up by output features, o/down by input features, the other dimension over `fsdp`."""
        if self.tensor_size > 1 and param.dim() == 2:
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
                return ("tensor", "fsdp")
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                return ("fsdp", "tensor")
        return _prepare_spmd_partition_spec(param, shard_maximal=True)


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


def pretrained_rows(
    weights: SafetensorsFolder, name: str, shape: Tuple[int, ...], start: int, stop: int
) -> torch.Tensor:
    """Rows [start, stop) of the pretrained tensor `name` for a parameter of `shape`."""
    stored = tuple(weights.shape(name))
    if stored == shape:
        return weights.rows(name, start, stop)
    if name in VOCAB_KEYS and stored[1:] == shape[1:] and stored[0] < shape[0]:
        # a smaller vocabulary: the mean of the new rows needs the whole (one) tensor
        return pad_vocab_rows(weights.rows(name).float(), shape[0])[start:stop]
    raise ValueError(
        f"model.pretrained={weights.location}: {name} has shape {list(stored)}, the model expects {list(shape)}"
    )
