"""The model as the planner sees it: the few numbers that set its parameters, FLOPs and activations.

A `ModelShape` describes any decoder-only transformer with one attention and one MLP per layer: HF Llama (the
model lemur-torch trains; SwiGLU, 3 FFN matrices, untied embeddings) as well as, for calibration against other
trainers' published runs, MPT (GELU MLP of 2 matrices, multi-head attention, tied embeddings, learned position
embeddings counted in `extra_params`) or MaxText's models (head size not equal to hidden / heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

from omegaconf import DictConfig


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    ffn_matrices: int = 3  # 3: SwiGLU (gate, up, down); 2: GELU/ReLU MLP (up, down)
    vocab: int = 32000
    tied_embeddings: bool = False
    head_dim: int = 0  # 0: hidden // heads
    extra_params: int = 0  # parameters outside this template (e.g. MPT's learned position embeddings)
    name: str = ""

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def layer_matmul_params(self) -> int:
        """Weights of the layer's linear projections: q and o, k and v, and the FFN matrices."""
        return 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim + self.ffn_matrices * self.hidden * self.ffn

    @property
    def layer_params(self) -> int:
        return self.layer_matmul_params + 2 * self.hidden  # two norm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def root_params(self) -> int:
        """The FSDP root group: embedding, final norm, lm_head (the same tensor when tied)."""
        return self.embedding_params + self.hidden + self.extra_params

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def model_flops_per_token(self, seq_len: int) -> float:
        """The trainer's MFU numerator (lemur_torch.model.flops_per_token): 6N + 12 * L * d * s, attention
        counted in full (not halved for causality)."""
        return 6.0 * self.total_params + 12.0 * self.layers * self.hidden * seq_len

    def layer_shapes(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) of each parameter of one layer, in the order HF Llama registers them."""
        h, q, kv, f = self.hidden, self.q_dim, self.kv_dim, self.ffn
        mlp = [("gate_proj", (f, h)), ("up_proj", (f, h))][3 - self.ffn_matrices :] + [("down_proj", (h, f))]
        attn = [("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))]
        return attn + mlp + [("input_layernorm", (h,)), ("post_attention_layernorm", (h,))]

    def root_shapes(self) -> List[Tuple[str, Tuple[int, ...]]]:
        v, h = self.vocab, self.hidden
        shapes = [("embed_tokens", (v, h)), ("norm", (h,))] + ([] if self.tied_embeddings else [("lm_head", (v, h))])
        return shapes + ([("extra", (self.extra_params,))] if self.extra_params else [])

    def layer_tensors(self) -> List[Tuple[int, int]]:
        """(dim 0, numel) of each parameter of one layer."""
        return [(shape[0], math.prod(shape)) for _, shape in self.layer_shapes()]

    def root_tensors(self) -> List[Tuple[int, int]]:
        return [(shape[0], math.prod(shape)) for _, shape in self.root_shapes()]

    def all_shapes(self) -> List[Tuple[str, Tuple[int, ...]]]:
        return self.layer_shapes() * self.layers + self.root_shapes()

    @classmethod
    def from_model_config(cls, m: DictConfig) -> "ModelShape":
        """The shape of the run's `model` group (HF LlamaForCausalLM: SwiGLU, untied or tied embeddings)."""
        return cls(
            layers=int(m.num_hidden_layers),
            hidden=int(m.hidden_size),
            heads=int(m.num_attention_heads),
            kv_heads=int(m.num_key_value_heads),
            ffn=int(m.intermediate_size),
            ffn_matrices=3,
            vocab=int(m.vocab_size),
            tied_embeddings=bool(m.tie_word_embeddings),
            name=str(m.get("name", "")),
        )


def padded_shard(tensors: List[Tuple[int, int]], shards: int) -> int:
    """Elements one rank stores for these tensors under FSDP2's dim-0 sharding: ceil(dim0 / shards) rows of
    each (the padded shard: rank 0 always holds that many, the last ranks fewer or none)."""
    return sum(-(-dim0 // shards) * (numel // dim0) for dim0, numel in tensors)


# the projections the XLA backend splits Megatron-style over the mesh's tensor axis: by output features (dim 0) or
# by input features (dim 1) (lemur_torch/parallel/xla/materialise.py HostShards.param_spec)
COLUMN_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_SPLIT = ("o_proj", "down_proj")


def spmd_shard(shapes: List[Tuple[str, Tuple[int, ...]]], fsdp: int, tensor: int = 1) -> int:
    """Elements one device stores under the XLA backend's sharding over an (fsdp, tensor) mesh: FSDPv2's rule
    (the largest dimension over `fsdp`, padded as XLA pads), or with `tensor` > 1 the split projections over
    `tensor` along their split dimension and over `fsdp` along the other."""
    total = 0
    for name, shape in shapes:
        if tensor > 1 and len(shape) == 2 and name in COLUMN_SPLIT + ROW_SPLIT:
            t_dim = 0 if name in COLUMN_SPLIT else 1
            total += -(-shape[t_dim] // tensor) * -(-shape[1 - t_dim] // fsdp)
            continue
        largest = max(shape)
        total += -(-largest // fsdp) * (math.prod(shape) // largest)
    return total
