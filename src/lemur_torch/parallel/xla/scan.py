"""parallel.scan_layers: the decoder layers as one torch_xla scan, so that tracing and compiling do not grow
with depth (80 layers at 70B), with activation checkpointing as a partition of the scanned layer.

torch_xla's scan under SPMD calls into JAX through torchax (which imports flax): the `tpu` extra and the XLA
test lane install them, pinned together.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
from functorch.compile import default_partition, min_cut_rematerialization_partition
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy
from torch_xla.experimental.scan import scan


class ScannedLayers(nn.ModuleList):
    """The decoder layers run as one torch_xla scan (`torch_xla.experimental.scan`): one layer's forward and
    backward are traced and compiled once and looped over the layers' stacked weights in an XLA While, so
    trace and compile time do not grow with depth. Still a ModuleList holding the same layers, so parameter
    names, checkpoints and exports are unchanged; only the slice that HF's LlamaModel.forward iterates over
    (`self.layers[: num_hidden_layers]`) is one callable running the scan.

    The carry is (hidden states, cos, sin, positions as float; scan differentiates its whole carry, and
    integer tensors have no gradient). `partition` is the AOTAutograd partitioner that decides what the
    backward recomputes: None keeps every activation, recompute_all_partition is activation checkpointing
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


def recompute_all_partition(joint_module, joint_inputs, *, num_fwd_outputs, **kwargs):
    """Activation checkpointing for the scanned layer, as torch.utils.checkpoint does it: every operation of
    the layer is recomputed in the backward pass, so only the layer's input is saved per layer. Marks each
    node must-recompute, then lets functorch's min-cut partitioner split forward and backward."""
    for node in joint_module.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and "recompute" not in node.meta:
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta["ac_graph_id"] = 0
    return min_cut_rematerialization_partition(joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
