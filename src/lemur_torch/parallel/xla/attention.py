"""Attention implementations for the torch_xla backend, registered through transformers' AttentionInterface.

Both derive the per-document mask of a packed row from `position_ids` on the device. HF's own mask builder
cannot be used on XLA: it decides "packed or not" with a Python `if` on a tensor
(`find_packed_sequence_indices`), which syncs with the host and cuts the step into several graphs. An
implementation name that is not in transformers' mask registry makes HF skip mask creation altogether and
pass `attention_mask=None` (and `position_ids` through **kwargs), so the whole step stays one graph.

- `lemur_xla_sdpa`: SDPA with a boolean causal & same-document mask; any XLA device (the CPU test lane).
- `lemur_xla_flash`: the Pallas flash-attention kernel with segment ids = document ids; TPU only
  (`model.attention=auto` picks it on TPU).

`implementation_for` is what `model.attention` means under this backend, for the gate and the backend alike.
This module imports neither torch_xla nor transformers at the top: the gate imports it on any machine.

A document starts wherever the position does not follow the previous one by 1, exactly HF's rule, so the
masks equal what HF builds for the same packed batch on an eager device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from lemur_torch.batch import row_document_ids
from lemur_torch.errors import ConfigError

SDPA = "lemur_xla_sdpa"
FLASH = "lemur_xla_flash"
# the values of model.attention this backend runs (flex and flash are the FSDP backend's CUDA kernels)
CHOICES = ("auto", "sdpa", "xla_flash")

# Set by the backend before the first forward: the flash kernel's SPMD partition spec for [B, H, S, D].
_flash_partition_spec: Optional[Tuple] = None


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    # [B, KV, S, D] -> [B, KV * n, S, D], each KV head repeated for its n query heads (GQA)
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _same_dtype(query, key, value):
    # under autocast v comes out of its projection in bf16 while RoPE's fp32 cos/sin promote q and k back
    # to fp32; the kernels want one dtype, the projections' (no-op in fp32)
    return query.to(value.dtype), key.to(value.dtype), value


def _position_ids(kwargs, q: torch.Tensor) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ValueError("the XLA attention needs position_ids (the trainer always passes them)")
    return pos.expand(q.shape[0], -1) if pos.shape[0] != q.shape[0] else pos


def xla_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """q [B, H, S, D], k/v [B, KV, S, D] -> ([B, S, H, D], None), causal within each packed document."""
    if attention_mask is not None:
        raise ValueError("the XLA attention is mask-free: pass position_ids, not attention_mask")
    doc = row_document_ids(_position_ids(kwargs, query))
    query, key, value = _same_dtype(query, key, value)
    s = query.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    n = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, _repeat_kv(key, n), _repeat_kv(value, n), attn_mask=mask[:, None], dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def xla_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Pallas flash attention (TPU): causal, documents separated by segment ids, GQA heads repeated."""
    from torch_xla.experimental.custom_kernel import flash_attention  # the XLA environment only (see above)

    if attention_mask is not None:
        raise ValueError("the XLA attention is mask-free: pass position_ids, not attention_mask")
    if dropout:
        raise ValueError("xla_flash has no attention dropout")
    seg = row_document_ids(_position_ids(kwargs, query)).to(torch.int32)
    query, key, value = _same_dtype(query, key, value)
    n = query.shape[1] // key.shape[1]
    out = flash_attention(
        query,
        _repeat_kv(key, n),
        _repeat_kv(value, n),
        causal=True,
        q_segment_ids=seg,
        kv_segment_ids=seg,
        sm_scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        partition_spec=_flash_partition_spec,
    )
    return out.transpose(1, 2).contiguous(), None


def register(partition_spec: Optional[Tuple] = None) -> None:
    """Make both names usable as `config._attn_implementation` (idempotent)."""
    global _flash_partition_spec
    from transformers import AttentionInterface  # seconds to import: not on the gate's path (see above)

    _flash_partition_spec = partition_spec
    AttentionInterface.register(SDPA, xla_sdpa_attention)
    AttentionInterface.register(FLASH, xla_flash_attention)


def implementation_for(choice: str, device_type: str) -> str:
    """`model.attention` -> the implementation this backend installs on `device_type` (PJRT's: "TPU", "CPU");
    a ConfigError naming the key for what it cannot run. `auto` is the Pallas flash kernel on TPU (no
    [B,1,S,S] mask: O(S) memory at seq 4096) and the mask-free SDPA on other PJRT devices."""
    if choice in ("flex", "flash"):
        raise ConfigError(
            "model.attention", f"{choice} is not available with parallel.backend=xla_spmd; use sdpa, xla_flash or auto"
        )
    if choice not in CHOICES:
        raise ConfigError("model.attention", f"unknown attention {choice!r}; use one of {', '.join(CHOICES)}")
    if choice == "sdpa" or (choice == "auto" and device_type != "TPU"):
        return SDPA
    if device_type != "TPU":
        raise ConfigError(
            "model.attention",
            f"xla_flash needs a TPU (the Pallas kernel does not run on {device_type}); use "
            "model.attention=sdpa or auto",
        )
    return FLASH
