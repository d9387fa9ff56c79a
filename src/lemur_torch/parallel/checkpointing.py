"""Activation checkpointing of the FSDP backend's decoder layers (`parallel.activation_checkpointing`).

- `full`: the layer keeps only its input; its whole forward runs again in backward.
- `every_n`: `full` for every `ac_every_n`-th layer (0, n, 2n, ...), the others keep everything.
- `selective`: torchtitan's op-level policy (torchtitan/distributed/activation_checkpoint.py, `_apply_op_sac`
  with its `_save_list`), through torch.utils.checkpoint's selective checkpointing: the layer keeps its input,
  the outputs of its attention kernel and of every other matmul (the 1st, 3rd, ...: in a Llama layer q, v, gate
  and down), and recomputes the rest in backward: the cheap elementwise ops (norms, RoPE, SiLU, products) and
  the other matmuls (k, o, up). The policy is consulted per op at dispatch, so it holds eagerly and under
  torch.compile (which traces it) alike.

Applied by parallel/fsdp.py's `apply_fsdp` before compile and fully_shard, so FSDP2's gathers stay outside the
recomputed region.
"""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# ops by their `namespace.name` (str of an OpOverload without its overload); kernels that are not installed
# simply never run. The matmuls counted for "every other": plain and float8 (torchao's scaled mm)
MATMULS = frozenset({"aten.mm", "aten._scaled_mm"})
# attention kernels (their output and log-sum-exp are saved): SDPA's CPU and CUDA kernels, flash-attn's and
# torch's varlen kernels (lemur_torch.attention), FlexAttention; and the amax of float8's scaling (a scalar)
ALWAYS_SAVED = frozenset(
    {
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
        "aten._flash_attention_forward",
        "aten._efficient_attention_forward",
        "torch_attn._varlen_attn",
        "flash_attn._flash_attn_varlen_forward",
        "flash_attn._flash_attn_forward",
        "flex_attention",
        "aten.max",
    }
)


def op_name(func) -> str:
    return str(func).rsplit(".", 1)[0] if str(func).count(".") >= 2 else str(func)


def selective_policy() -> Callable:
    """A fresh policy for one checkpointed forward (and its recomputation): save attention and every other
    matmul, recompute everything else. Forward and recomputation count their matmuls apart, so the
    recomputation asks for exactly the outputs the forward saved."""
    matmuls = {False: 0, True: 0}

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        name = op_name(func)
        if name in MATMULS:
            matmuls[ctx.is_recompute] += 1
            return CheckpointPolicy.MUST_SAVE if matmuls[ctx.is_recompute] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if name in ALWAYS_SAVED else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_context():
    return create_selective_checkpoint_contexts(selective_policy())


def checkpoint_layer(layer: nn.Module, index: int, p: DictConfig) -> nn.Module:
    """Decoder layer `index` wrapped as `parallel.activation_checkpointing` says (or returned as it is)."""
    policy = p.activation_checkpointing
    if policy == "full" or (policy == "every_n" and index % p.ac_every_n == 0):
        return checkpoint_wrapper(layer, preserve_rng_state=False)
    if policy == "selective":
        return checkpoint_wrapper(layer, context_fn=selective_context, preserve_rng_state=False)
    return layer
