"""Per-document attention: one contract from the loader's document boundaries to the kernel.

The contract. Every batch carries `doc_lens` (lemur_torch/batch.py), the lengths of each row's documents. The
FSDP backend turns them, on the host, into the varlen form (`cu_seqlens` of the micro-batch flattened to one
row, `max_seqlen` as a Python int) before the batch moves to the device, and `forward_kwargs` hands them to
the model under transformers' own names (`cu_seq_lens_q/k`, `max_length_q/k`), which HF forwards untouched
to every attention call. No kernel infers documents from position_ids on the device, whatever the batch size.

The implementations (`model.attention`), all through transformers' attention interface, no modeling fork:
- `sdpa`: HF's own SDPA function, given a [B, 1, S, S] document-causal mask built once per forward (HF takes
  a prepared 4-D mask as it is). Today's path, and the CPU default.
- `flex`: FlexAttention with a block-sparse document-causal BlockMask built once per forward; compiled.
  Grouped-query attention without expanding K/V.
- `flash`: variable-length flash attention over the flattened micro-batch, from the best kernel present:
  flash-attn's `flash_attn_varlen_func`, else torch's `torch.nn.attention.varlen.varlen_attn` (on Hopper
  with FlashAttention-3 when its kernels are installed). bf16/fp16 only; K/V heads are not expanded.
- `auto`: `resolve_auto`, a function of (device type, kernels available); what it picked is logged.

This module is the FSDP backend's (CUDA and CPU); `xla_flash` and the torch_xla backend's own mask-free
implementations, and what `auto` means there, are in lemur_torch/parallel/xla/attention.py.

The kernels sit behind one seam, `find_kernel(impl, device_type)`. Tests substitute CPU reference kernels with
the kernels' own signatures (`varlen_reference` for flash, `flex_reference` for flex, whose torch kernel has
no CPU backward), so the boundaries, the kwargs, the transformers call path and the output layout all run in
`make test`; only the kernel call differs.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

from lemur_torch.batch import document_ids, document_lengths, varlen_boundaries
from lemur_torch.errors import ConfigError

log = logging.getLogger(__name__)

# the values of model.attention this backend runs (xla_flash is the XLA backend's)
CHOICES = ("auto", "sdpa", "flex", "flash")
LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# the keywords _torch_varlen passes, and the torch release whose varlen_attn first takes each (2.10: none of them)
TORCH_VARLEN_KWARGS = {"scale": (2, 11), "window_size": (2, 11), "enable_gqa": (2, 12)}


@dataclass(frozen=True)
class Kernel:
    """An attention kernel behind the seam. `key` names it in transformers' registry, `name` in the log."""

    key: str
    name: str
    fn: Callable
    dtypes: Tuple[torch.dtype, ...]


@dataclass(frozen=True)
class Selection:
    impl: str  # sdpa | flex | flash
    kernel: Optional[Kernel]
    summary: str  # for the start-of-run log


# -- the kernels ----------------------------------------------------------------------------------------


def _torch_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """torch's varlen attention behind flash-attn's signature."""
    from torch.nn.attention.varlen import varlen_attn  # torch >= 2.12 only: imported where it is used

    if dropout_p:
        raise ValueError("torch's varlen_attn has no dropout")
    return varlen_attn(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        scale=softmax_scale,
        window_size=(-1, 0) if causal else (-1, -1),
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _flash_kernel(device_type: str) -> Optional[Kernel]:
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    if importlib.util.find_spec("flash_attn") is not None:
        import flash_attn  # optional (the `gpu` extra), CUDA only

        return Kernel(
            "flash_attn",
            f"flash-attn {flash_attn.__version__} flash_attn_varlen_func",
            flash_attn.flash_attn_varlen_func,
            LOW_PRECISION,
        )
    varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if not varlen or torch.cuda.get_device_capability()[0] < 8 or torch_varlen_mismatch():
        return None  # torch's FlashAttention-2 needs Ampere or newer, and a varlen_attn taking our keywords
    version = "FlashAttention-2"
    if torch.cuda.get_device_capability()[0] == 9 and importlib.util.find_spec("flash_attn_interface") is not None:
        # torch >= 2.12 only, like the varlen kernel itself
        from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl

        if current_flash_attention_impl() != "FA3":
            activate_flash_attention_impl("FA3")  # process-wide: SDPA's flash kernel becomes FA3 as well
        version = "FlashAttention-3"
    return Kernel("torch_varlen", f"torch.nn.attention.varlen.varlen_attn ({version})", _torch_varlen, LOW_PRECISION)


def torch_varlen_mismatch() -> Optional[str]:
    """Why the installed torch's varlen_attn cannot run behind `_torch_varlen` (a keyword it passes is not in its
    signature), or None: a torch too old fails when `model.attention` is resolved, not after a 70B load."""
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return None  # before torch 2.10 there is no fallback to check
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    missing = [k for k in TORCH_VARLEN_KWARGS if k not in params]
    if not missing or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    need = ".".join(map(str, max(TORCH_VARLEN_KWARGS[k] for k in missing)))
    return (
        f"flash without flash-attn runs torch.nn.attention.varlen.varlen_attn, which takes no {', '.join(missing)} "
        f"in torch {torch.__version__}: install torch >= {need} or flash-attn (the `gpu` extra), or use sdpa"
    )


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    return torch.compile(torch_flex_attention, dynamic=False)


def flex_compiled(query, key, value, block_mask=None, scale=None, enable_gqa=False):
    """flex_attention, compiled once per process; inside an already compiled region (parallel.compile) the
    plain op, which the enclosing graph compiles."""
    fn = torch_flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    return fn(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


COMPILED_FLEX = Kernel("compiled", "torch.compile(flex_attention)", flex_compiled, ALL_FLOATS)


def find_kernel(impl: str, device_type: str) -> Optional[Kernel]:
    """The kernel `impl` ("flash" or "flex") runs on for training on `device_type`, or None. The seam tests
    substitute: everything around the kernel call is the same code on every device."""
    if impl == "flash":
        return _flash_kernel(device_type)
    if impl == "flex":
        # FlexAttention has a backward on CUDA only (torch raises "does not support backward on CPU")
        return COMPILED_FLEX if device_type == "cuda" else None
    return None


@torch.compiler.disable
def varlen_reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False
):
    """CPU stand-in for flash_attn_varlen_func (same signature and layouts: q [Tq, H, D], k/v [Tk, KV, D],
    int32 cumulative lengths, host max lengths): plain per-document softmax attention, bottom-right aligned
    causal mask as flash-attn's. It checks the contract a real kernel silently relies on."""
    if dropout_p:
        raise ValueError("varlen_reference: no dropout")
    for name, cu, total, mx in (
        ("q", cu_seqlens_q, q.shape[0], max_seqlen_q),
        ("k", cu_seqlens_k, k.shape[0], max_seqlen_k),
    ):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(
                f"cu_seqlens_{name} must be int32 [D+1] on {q.device}, got {cu.dtype} {tuple(cu.shape)} on {cu.device}"
            )
        lens = cu.diff()
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lens <= 0).any()):
            raise ValueError(f"cu_seqlens_{name} {cu.tolist()} does not cut {total} tokens into non-empty documents")
        if not isinstance(mx, int) or mx != int(lens.max()):
            raise ValueError(
                f"max_seqlen_{name} must be the longest length {int(lens.max())} as a Python int, got {mx!r}"
            )
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    group = q.shape[1] // k.shape[1]
    outs = []
    for (q0, q1), (k0, k1) in zip(
        zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:]), zip(cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])
    ):
        qd = q[q0:q1].transpose(0, 1)  # [H, L, D]
        kd = k[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        vd = v[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        scores = (qd @ kd.transpose(1, 2)) * scale
        if causal:
            lq, lk = q1 - q0, k1 - k0
            allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(outs)


def _blocks_dense(num: torch.Tensor, idx: torch.Tensor, n_kv: int) -> torch.Tensor:
    """BlockMask (num_blocks [B, H, nq], indices [B, H, nq, *]) -> dense [B, H, nq, n_kv] bool."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    dense = torch.zeros(*idx.shape[:-1], n_kv + 1, dtype=torch.bool, device=idx.device)
    dense.scatter_(-1, torch.where(valid, idx.long(), n_kv), True)
    return dense[..., :n_kv]


@torch.compiler.disable
def flex_reference(query, key, value, block_mask=None, scale=None, enable_gqa=False):
    """CPU stand-in for flex_attention (its signature and layouts), reading the BlockMask as the kernel does:
    full blocks attend entirely, partial blocks through mask_mod, blocks not listed not at all. So a wrong
    block structure shows here as it would on the GPU. Plain torch, so it has a backward on CPU."""
    B, H, S, D = query.shape
    L = key.shape[2]
    qb, kb = block_mask.BLOCK_SIZE
    n_kv = -(-L // kb)
    allowed_blocks = _blocks_dense(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv)
    full = torch.zeros_like(allowed_blocks)
    if block_mask.full_kv_num_blocks is not None:
        full = _blocks_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv)
    expand = lambda m: m.repeat_interleave(qb, -2)[..., :S, :].repeat_interleave(kb, -1)[..., :L]  # noqa: E731
    b = torch.arange(B, device=query.device).view(B, 1, 1, 1)
    h = torch.arange(allowed_blocks.shape[1], device=query.device).view(1, -1, 1, 1)
    q_idx = torch.arange(S, device=query.device).view(1, 1, S, 1)
    kv_idx = torch.arange(L, device=query.device).view(1, 1, 1, L)
    allowed = expand(full) | (expand(allowed_blocks) & block_mask.mask_mod(b, h, q_idx, kv_idx))
    group = H // key.shape[1]
    k = key.repeat_interleave(group, 1) if enable_gqa else key
    v = value.repeat_interleave(group, 1) if enable_gqa else value
    scores = (query @ k.transpose(-1, -2)) * (scale if scale is not None else D**-0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return probs.nan_to_num(0.0) @ v  # a query row with no key at all gets zeros, as flex_attention gives


VARLEN_REFERENCE = Kernel(
    "reference", "CPU reference (test stand-in for flash_attn_varlen_func)", varlen_reference, ALL_FLOATS
)
FLEX_REFERENCE = Kernel("reference", "CPU reference (test stand-in for flex_attention)", flex_reference, ALL_FLOATS)


# -- transformers attention functions -------------------------------------------------------------------


def varlen_attention(
    kernel: Kernel,
    module: nn.Module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    cu_seq_lens_q=None,
    cu_seq_lens_k=None,
    max_length_q=None,
    max_length_k=None,
    **kwargs,
):
    """q [B, H, S, D], k/v [B, KV, S, D] -> ([B, S, H, D], None): the micro-batch flattened to one row of
    B * S tokens (a free view: the projections are laid out [B, S, H, D]) cut by cu_seqlens."""
    if attention_mask is not None or cu_seq_lens_q is None:
        raise ValueError("the varlen attention takes document boundaries (cu_seq_lens_q/k, max_length_q/k), not a mask")
    B, H, S, D = query.shape
    q = query.transpose(1, 2).reshape(B * S, H, D)
    k = key.transpose(1, 2).reshape(B * S, key.shape[1], D)
    v = value.transpose(1, 2).reshape(B * S, value.shape[1], D)
    out = kernel.fn(
        q,
        k,
        v,
        cu_seq_lens_q,
        cu_seq_lens_k,
        max_length_q,
        max_length_k,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
    )
    return out.view(B, S, H, D), None


def flex_attention(
    kernel: Kernel, module: nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """q [B, H, S, D], k/v [B, KV, S, D], attention_mask = the forward's BlockMask -> ([B, S, H, D], None)."""
    if not isinstance(attention_mask, BlockMask):
        raise ValueError("the flex attention needs the BlockMask built from the batch's document boundaries")
    if dropout:
        raise ValueError("model.attention=flex has no attention dropout")
    out = kernel.fn(
        query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


# -- masks, built once per forward from the boundaries --------------------------------------------------


def document_causal_mask(doc: torch.Tensor) -> torch.Tensor:
    """[B, S] document ids -> [B, 1, S, S] bool: causal, and only within a document."""
    S = doc.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def document_block_mask(doc: torch.Tensor):
    """[B, S] document ids -> FlexAttention BlockMask (block-sparse: blocks of other documents are skipped,
    blocks inside one document's causal part run without evaluating the mask)."""

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    B, S = doc.shape
    return create_block_mask(document_causal, B, None, S, S, device=doc.device)


_warned_inferred = False


def _prepare_attention(impl: str, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
    """Forward pre-hook of the decoder stack: the boundaries (or, for a direct call without them, boundaries
    derived from position_ids on the host) become what `impl` needs, once per forward."""
    global _warned_inferred
    if kwargs.get("attention_mask") is not None:
        raise ValueError(
            "this model takes the batch's document boundaries (cu_seq_lens_q, max_length_q), not an attention_mask"
        )
    if kwargs.get("use_cache") or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError("the training model has no KV cache: load the HF export for generation")
    ids = (
        kwargs.get("input_ids")
        if kwargs.get("input_ids") is not None
        else (args[0] if args else kwargs["inputs_embeds"])
    )
    B, S = ids.shape[:2]
    if kwargs.get("cu_seq_lens_q") is None:
        if not _warned_inferred:
            log.warning(
                "model called without document boundaries: deriving them from position_ids on the host "
                "(a device sync); pass lemur_torch.attention.forward_kwargs(batch)"
            )
            _warned_inferred = True
        pos = kwargs.get("position_ids")
        pos = torch.arange(S).expand(B, S) if pos is None else pos.expand(B, S)
        cu, longest = varlen_boundaries(document_lengths(pos.cpu()))
        cu = cu.to(ids.device)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if impl in ("sdpa", "flex"):
        doc = document_ids(kwargs["cu_seq_lens_q"], B, S)
        kwargs["attention_mask"] = document_causal_mask(doc) if impl == "sdpa" else document_block_mask(doc)
    return args, kwargs


# -- selection, installation, batches -------------------------------------------------------------------


def resolve_auto(device_type: str, flash_runs: bool) -> str:
    """What `auto` means here: flash on CUDA where a varlen kernel runs in the run's precision, else sdpa."""
    return "flash" if device_type == "cuda" and flash_runs else "sdpa"


def _unavailable(impl: str, device_type: str) -> str:
    if impl == "flex":
        return (
            f"flex trains on CUDA only: FlexAttention has no backward on {device_type} "
            f"(torch {torch.__version__}); use model.attention=sdpa here"
        )
    return (device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8 and torch_varlen_mismatch()) or (
        f"flash needs a CUDA device (Ampere or newer) with flash-attn or torch.nn.attention.varlen; this process "
        f"runs on {device_type}: use model.attention=sdpa (or flex on CUDA)"
    )


def select(choice: str, device_type: str, param_dtype: torch.dtype) -> Selection:
    """Resolve `model.attention` for a process of the FSDP backend on `device_type` whose parameters compute in
    `param_dtype`; every impossible combination is a ConfigError naming it."""
    if choice == "xla_flash":
        raise ConfigError("model.attention", "xla_flash (Pallas) runs only with parallel.backend=xla_spmd on a TPU")
    if choice not in CHOICES:
        hint = (
            "flash_attention_2 detects packed documents only at batch size 1: use model.attention=flash; "
            if choice == "flash_attention_2"
            else ""
        )
        raise ConfigError("model.attention", f"{hint}unknown attention {choice!r}; use one of {', '.join(CHOICES)}")
    impl = choice
    if choice == "auto":
        flash = find_kernel("flash", device_type)
        impl = resolve_auto(device_type, flash is not None and param_dtype in flash.dtypes)
    kernel = None
    if impl in ("flash", "flex"):
        kernel = find_kernel(impl, device_type)
        if kernel is None:
            raise ConfigError("model.attention", _unavailable(impl, device_type))
        if param_dtype not in kernel.dtypes:
            raise ConfigError(
                "model.attention",
                f"{impl} ({kernel.name}) runs in bf16/fp16 only, but the parameters are "
                f"{str(param_dtype).replace('torch.', '')}: set parallel.mixed_precision=bf16, or use sdpa/flex",
            )
    what = "torch SDPA, [B,1,S,S] document-causal mask" if impl == "sdpa" else kernel.name
    return Selection(impl, kernel, f"{impl} ({'auto: ' if choice == 'auto' else ''}{what})")


def install(model: nn.Module, selection: Selection) -> None:
    """Point the HF model at the selected implementation and build its per-forward masks from the boundaries."""
    from transformers import AttentionInterface  # seconds to import: not on the gate's path, which imports this module

    impl, kernel = selection.impl, selection.kernel
    name = "sdpa"
    if impl == "flash":
        name = f"lemur_varlen.{kernel.key}"
        AttentionInterface.register(name, functools.partial(varlen_attention, kernel))
    elif impl == "flex":
        name = f"lemur_flex.{kernel.key}"
        AttentionInterface.register(name, functools.partial(flex_attention, kernel))
    elif impl != "sdpa":
        raise ValueError(f"{impl} is installed by its own backend")
    model.config._attn_implementation = name
    model.model.register_forward_pre_hook(functools.partial(_prepare_attention, impl), with_kwargs=True)


def forward_kwargs(batch: Dict[str, Any]) -> Dict[str, Any]:
    """The model's keyword arguments for a device batch: ids, positions and, where the backend prepared them,
    the document boundaries under transformers' own names."""
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "cu_seqlens" in batch:
        cu, longest = batch["cu_seqlens"], batch["max_seqlen"]
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return kwargs


def with_varlen_boundaries(batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Host batch -> the same batch plus `cu_seqlens` (int32) and `max_seqlen` (a Python int), computed here on
    the host so that no kernel reads them back from the device. A batch without `doc_lens` (not from the
    project's loaders) passes as it is: the model then derives boundaries from position_ids, with a warning."""
    if "doc_lens" not in batch:
        return batch
    cu, longest = varlen_boundaries(batch["doc_lens"])
    return {**batch, "cu_seqlens": cu, "max_seqlen": longest}
