"""The model: HF `LlamaForCausalLM` as it is, built on the meta device, plus weight init and the loss.

Backends shard the meta model first and materialise only their shards (`init_weights` after `to_empty`),
so no process ever holds a full 70B model. The loss is computed here from the logits, as a sum over label
tokens, so the trainer can divide by the global label-token count.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

IGNORE_INDEX = -100
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
    "hidden_act", "initializer_range",
)


def hf_llama_config(model_cfg: DictConfig) -> LlamaConfig:
    kwargs = {k: model_cfg[k] for k in _HF_FIELDS}
    config = LlamaConfig(**kwargs, bos_token_id=1, eos_token_id=2, use_cache=False)
    config._attn_implementation = model_cfg.attention
    return config


def build_meta_model(model_cfg: DictConfig) -> LlamaForCausalLM:
    """LlamaForCausalLM with every parameter on the meta device (free, any size)."""
    config = hf_llama_config(model_cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, initializer_range: float) -> None:
    """Llama's init (normal(0, std) for linear/embedding, ones for RMSNorm), shard by shard.

    Each parameter draws from a generator seeded by (seed, parameter name), so the values do not depend on
    the order of materialisation or the number of shards: a 2-rank FSDP run starts from exactly the weights
    of a 1-process run. DTensor shards draw the full tensor's values for their slice via `_full_init`.
    """
    for name, param in model.named_parameters():
        clean = clean_fqn(name)
        full_shape, local_slices = _full_shape_and_slices(param)
        if clean.endswith("norm.weight"):
            values = torch.ones(full_shape, dtype=torch.float32)
        else:
            gen = torch.Generator().manual_seed(_name_seed(seed, clean))
            values = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, initializer_range, generator=gen)
        local = _local_tensor(param)
        local.copy_(values[local_slices].to(local.dtype))


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
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full_shape_and_slices(param: torch.Tensor) -> Tuple[torch.Size, Tuple[slice, ...]]:
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


def token_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor, num_domains: int, chunk: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over label tokens (labels are unshifted, HF-style), computed in fp32 over chunks of
    `chunk` positions of the sequence, so the fp32 copy of the logits stays at [B, chunk, V].

    Chunks cut the sequence axis, never the batch axis: under SPMD the batch is what is sharded over devices,
    so every chunk keeps each device's own rows and no rows move between devices. The targets are shifted
    (labels[:, 1:] padded with -100), not the logits: slicing logits[:, :-1] would copy the largest activation
    of the model, forward and backward. Per-domain sums are products with a one-hot of the domain ids built by
    comparison with arange(num_domains), not index_add/scatter: torch_xla aborts tracing an index_add whose
    index is a chunk of a split (`Check failed: buffer != nullptr`), and a [tokens, domains] product is free
    next to the [tokens, vocab] logits.
    Returns (loss_sum, per-domain loss sums [D], per-domain label-token counts [D]); all fp32 on-device.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    domains = F.pad(domain_ids[:, 1:].long(), (0, 1), value=0)
    domain_range = torch.arange(num_domains, device=logits.device)
    total = logits.new_zeros((), dtype=torch.float32)
    dom_sum = logits.new_zeros((num_domains,), dtype=torch.float32)
    dom_cnt = logits.new_zeros((num_domains,), dtype=torch.float32)
    # split, not slicing: the backward of a slice writes into a zeroed full-size gradient per chunk,
    # split's backward is one concatenation (and no copy at all when one chunk covers everything)
    for lg, tg, d in zip(logits.split(chunk, dim=1), targets.split(chunk, dim=1), domains.split(chunk, dim=1)):
        lg = lg.float()  # [B, c, V]
        valid = tg != IGNORE_INDEX
        # cross-entropy as logsumexp - target logit, on [B, c, V] as it is (no reshape copy of a strided chunk)
        target_logit = lg.gather(-1, tg.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_tok = torch.where(valid, torch.logsumexp(lg, dim=-1) - target_logit, 0.0)  # [B, c]
        onehot = (d.unsqueeze(-1) == domain_range).float()  # [B, c, D]
        total = total + per_tok.sum()
        dom_sum = dom_sum + torch.einsum("bc,bcd->d", per_tok.detach(), onehot)
        dom_cnt = dom_cnt + torch.einsum("bc,bcd->d", valid.float(), onehot)
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
    """Training FLOPs per token, counting attention: 6N + 12 * L * d * s (RECIPE.md, scale arithmetic)."""
    return 6.0 * count_params(model_cfg) + 12.0 * model_cfg.num_hidden_layers * model_cfg.hidden_size * seq_len


def batch_label_tokens(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()

