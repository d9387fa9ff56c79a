"""The model: HF `LlamaForCausalLM` as it is, built on the meta device, plus weight init and the loss.

Backends shard the meta model first and materialise only their shards (`init_weights` after `to_empty`),
so no process ever holds a full 70B model, nor draws one: random values are a pure function of (seed,
parameter name, element index). The attention implementation is installed by the backend
(lemur_torch.attention). The loss is computed here from the logits, as a sum over label
tokens, so the trainer can divide by the global label-token count.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lemur_torch.batch import IGNORE_INDEX, Batch

_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "hidden_act",
    "initializer_range",
)


def hf_llama_config(model_cfg: DictConfig) -> LlamaConfig:
    kwargs = {k: model_cfg[k] for k in _HF_FIELDS}
    # HF's own SDPA until a backend installs the run's attention (lemur_torch.attention): a model built
    # here and used as it is (tools, tests) behaves as transformers' does
    return LlamaConfig(**kwargs, bos_token_id=1, eos_token_id=2, use_cache=False, attn_implementation="sdpa")


def build_meta_model(model_cfg: DictConfig) -> LlamaForCausalLM:
    """LlamaForCausalLM with every parameter on the meta device (free, any size)."""
    config = hf_llama_config(model_cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model


# Random init draws fixed blocks of each parameter's flattened values, block i from a generator seeded by
# (seed, parameter name, i): element j's value depends only on (seed, name, j), so a rank draws just the blocks
# its shard overlaps, and every sharding (FSDP2 rows, HSDP, XLA's whole pieces, one process) gets the same
# values. Blocks of 2^14 elements (64 KiB of fp32): a 70B matrix's shard on 512 ranks is ~0.5M elements,
# so the parts of the two edge blocks drawn and dropped stay a few percent, at ~20 us of seeding per block.
INIT_BLOCK = 1 << 14


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, initializer_range: float) -> None:
    """Llama's init (normal(0, std) for linear/embedding, ones for RMSNorm) of the local shards only.

    A rank draws the values of its own shard (plus at most a block either side of each contiguous run of it),
    never a full tensor: at 70B on 512 ranks that is ~1/512 of the model instead of the whole of it per rank.
    """
    for name, param in model.named_parameters():
        clean = clean_fqn(name)
        local = _local_tensor(param)
        if local.numel() == 0:  # FSDP2 leaves some ranks without rows of a small tensor
            continue
        if clean.endswith("norm.weight"):
            local.fill_(1.0)
            continue
        full_shape, local_slices = full_shape_and_slices(param)
        # runs ascend, so consecutive runs that share a block (a cut along a later dimension) draw it once
        draw = functools.lru_cache(maxsize=2)(
            functools.partial(_normal_block, _name_seed(seed, clean), initializer_range, math.prod(full_shape))
        )
        flat = local.view(-1) if local.is_contiguous() else torch.empty(local.numel(), dtype=local.dtype)
        at = 0
        for start, length in _flat_runs(full_shape, local_slices):
            _draw_into(flat[at : at + length], draw, start)
            at += length
        if not local.is_contiguous():
            local.copy_(flat.view(local.shape))


def _normal_block(name_seed: int, std: float, numel: int, block: int) -> torch.Tensor:
    """Block `block` of a parameter of `numel` elements: always drawn whole, so its values never depend on
    which part of it a caller needs (torch's normal_ fills a tensor in chunks whose rounding depends on size)."""
    n = min(INIT_BLOCK, numel - block * INIT_BLOCK)
    gen = torch.Generator().manual_seed((name_seed + block * 0x9E3779B97F4A7C15) & ((1 << 63) - 1))
    return torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=gen)


def _draw_into(out: torch.Tensor, draw, start: int) -> None:
    """Fill `out` with the values of flat elements start .. start + len(out), block by block."""
    end = start + out.numel()
    for block in range(start // INIT_BLOCK, -(-end // INIT_BLOCK)):
        lo = block * INIT_BLOCK
        a, b = max(start, lo), min(end, lo + INIT_BLOCK)
        out[a - start : b - start].copy_(draw(block)[a - lo : b - lo])


def _flat_runs(shape: torch.Size, slices: Tuple[slice, ...]) -> List[Tuple[int, int]]:
    """The local region of a tensor of `shape` as contiguous runs (start, length) of its row-major flattening:
    one run for a Shard(0) slice, one per leading index where a later dimension is cut."""
    bounds = [sl.indices(size)[:2] for sl, size in zip(slices, shape)]
    cut = max((d for d, (lo, hi) in enumerate(bounds) if (lo, hi) != (0, shape[d])), default=0)
    inner = math.prod(shape[cut + 1 :])
    run = (bounds[cut][1] - bounds[cut][0]) * inner
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    heads = itertools.product(*(range(lo, hi) for lo, hi in bounds[:cut]))
    return [(sum(i * s for i, s in zip(head, strides)) + bounds[cut][0] * inner, run) for head in heads] if run else []


def reset_rope_buffers(model: nn.Module, device: torch.device) -> None:
    """Rotary inv_freq buffers are non-persistent, so `to_empty` leaves them garbage: rebuild each rotary
    module from its config and copy its buffers in (works for every rope_type HF supports)."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))
            module.attention_scaling = fresh.attention_scaling


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_shape_and_slices(param: torch.Tensor) -> Tuple[torch.Size, Tuple[slice, ...]]:
    """Global shape and the slices of it held locally (DTensor Shard(0) from FSDP2; plain tensors: all)."""
    if not hasattr(param, "device_mesh"):
        return param.shape, tuple(slice(None) for _ in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.shape, tuple(slice(o, o + s) for o, s in zip(offset, shape))


def clean_fqn(name: str) -> str:
    """State-dict key as in the HF checkpoint: drop wrapper segments added by AC, compile and XLA FSDPv2."""
    for seg in ("_checkpoint_wrapped_module.", "_orig_mod.", "_orig_module.", "_fsdp_wrapped_module."):
        name = name.replace(seg, "")
    return name


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token next-token cross-entropy [B, S] (fp32; 0 where the target is IGNORE_INDEX) of logits [B, S, V] in
    any dtype, computed in fp32 `chunk` positions of the sequence at a time, forward and backward.

    Autograd over the plain ops would keep every chunk's fp32 copy of the logits until the backward (logsumexp
    saves its input): 4 * B * S * V bytes. This keeps only the logits themselves (the caller holds them anyway),
    the targets and the fp32 log-sum-exp [B, S]; the backward recomputes each chunk's softmax in fp32 and writes
    its gradient, (softmax - one_hot(target)) * incoming gradient, into one gradient tensor in the logits' dtype.
    So at most one chunk's fp32 [B, chunk, V] lives at a time, forward or backward (none in the backward of fp32
    logits, whose gradient is computed in place in the gradient tensor). The forward works on that one buffer in
    place (shift by the max while upcasting, exp, sum): torch.logsumexp allocates two more fp32 chunks for its
    intermediates, which were a quarter of a toy step's CPU time; the buffer is allocated once per call, as each
    fresh allocation of that size costs the CPU a page fault per page."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        per_tok, lse = [], []
        buf = p = None  # one fp32 [B, c, V] buffer for every chunk (the last chunk uses its leading part)
        # split, not slicing: each chunk is a view, so no copy of the largest activation of the model is made
        for lg, tg in zip(logits.split(chunk, dim=1), targets.split(chunk, dim=1)):
            if buf is None:
                buf = torch.empty(lg.shape, dtype=torch.float32, device=lg.device)
            p = buf[:, : lg.shape[1]]
            target_logit = lg.gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
            top = lg.amax(dim=-1, keepdim=True).float()  # the max of the values is exact in any dtype
            if lg.dtype == torch.float32:
                torch.sub(lg, top, out=p)  # the shift written into the buffer: no copy of the chunk first
            else:
                p.copy_(lg).sub_(top)  # (CPU kernels of mixed-dtype ops are slower than an upcast first)
            chunk_lse = p.exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
            per_tok.append(torch.where(tg != IGNORE_INDEX, chunk_lse - target_logit, 0.0))
            lse.append(chunk_lse)
        del buf, p
        ctx.chunk = chunk
        ctx.save_for_backward(logits, targets, torch.cat(lse, dim=1))
        return torch.cat(per_tok, dim=1)

    @staticmethod
    def backward(ctx, grad_per_tok: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        # fp32 logits: each chunk's gradient is computed in place in `grad` itself; other dtypes go through one
        # fp32 buffer, reused for every chunk, and are written into `grad` once
        buf = None
        for start in range(0, logits.shape[1], ctx.chunk):
            stop = min(start + ctx.chunk, logits.shape[1])
            tg = targets[:, start:stop]
            g = torch.where(tg != IGNORE_INDEX, grad_per_tok[:, start:stop].float(), 0.0).unsqueeze(-1)
            out = grad[:, start:stop]
            if logits.dtype != torch.float32:
                if buf is None:
                    buf = torch.empty(out.shape, dtype=torch.float32, device=out.device)
                p = buf[:, : stop - start]
            else:
                p = out
            if p is out:
                torch.sub(logits[:, start:stop], lse[:, start:stop].unsqueeze(-1), out=p)
            else:
                p.copy_(logits[:, start:stop]).sub_(lse[:, start:stop].unsqueeze(-1))
            p.exp_().mul_(g)
            p.scatter_add_(-1, tg.clamp(min=0).unsqueeze(-1), -g)
            if p is not out:
                out.copy_(p)
        return grad, None, None


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, chunk: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over label tokens (labels are unshifted, HF-style), computed in fp32 over chunks of
    `chunk` positions of the sequence by ChunkedCrossEntropy, so the fp32 copy of the logits stays at
    [B, chunk, V], in the forward and in the backward.

    Chunks cut the sequence axis, never the batch axis: under SPMD the batch is what is sharded over devices,
    so every chunk keeps each device's own rows and no rows move between devices. The targets are shifted
    (labels[:, 1:] padded with IGNORE_INDEX), not the logits: slicing logits[:, :-1] would copy them too, forward
    and backward. Per-domain sums are products with a one-hot of the domain ids built by comparison with
    arange(num_domains), not index_add/scatter: torch_xla aborts tracing an index_add whose index is a chunk of a
    split (`Check failed: buffer != nullptr`), and a [tokens, domains] product is free next to the logits.
    Returns (loss_sum, per-domain loss sums [D], per-domain label-token counts [D]); all fp32 on-device.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    domains = F.pad(domain_ids[:, 1:].long(), (0, 1), value=0)
    domain_range = torch.arange(num_domains, device=logits.device)
    per_token = ChunkedCrossEntropy.apply(logits, targets, chunk)  # [B, S]
    total = logits.new_zeros((), dtype=torch.float32)
    dom_sum = logits.new_zeros((num_domains,), dtype=torch.float32)
    dom_cnt = logits.new_zeros((num_domains,), dtype=torch.float32)
    # summed chunk by chunk, in the order the sums have always been taken (the same values bit for bit)
    for per_tok, tg, d in zip(per_token.split(chunk, dim=1), targets.split(chunk, dim=1), domains.split(chunk, dim=1)):
        onehot = (d.unsqueeze(-1) == domain_range).float()  # [B, c, D]
        total = total + per_tok.sum()
        dom_sum = dom_sum + torch.einsum("bc,bcd->d", per_tok.detach(), onehot)
        dom_cnt = dom_cnt + torch.einsum("bc,bcd->d", (tg != IGNORE_INDEX).float(), onehot)
    return total, dom_sum, dom_cnt


def count_params(model_cfg: DictConfig) -> int:
    """Parameter count from the config alone (no model needed): embeddings, layers, norm, head."""
    h, i, L, V = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_hidden_layers, model_cfg.vocab_size
    head_dim = h // model_cfg.num_attention_heads
    kv = model_cfg.num_key_value_heads * head_dim
    attn = h * h * 2 + h * kv * 2
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    return V * h * (1 if model_cfg.tie_word_embeddings else 2) + L * per_layer + h


def flops_per_token(model_cfg: DictConfig, seq_len: int) -> float:
    """Training FLOPs per token, counting attention: 6N + 12 * L * d * s (the matmuls of the forward and
    backward: 6 FLOPs per parameter per token, plus attention's scores and values over the sequence)."""
    return 6.0 * count_params(model_cfg) + 12.0 * model_cfg.num_hidden_layers * model_cfg.hidden_size * seq_len


def batch_label_tokens(batch: Batch) -> torch.Tensor:
    """Label tokens of a micro-batch after the shift (the loss's denominator), as a 0-d device tensor."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
