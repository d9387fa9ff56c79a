"""The planner's memory model against this machine: the trainer's own model and step measured with torch's
MemTracker (live tensor bytes, by the storages autograd, the model and the optimizer hold).

The model as training builds it (build_meta_model, the CPU attention, apply_fsdp's checkpointing on one fp32
rank, init_weights), a step as the trainer runs it (forward with the batch's document boundaries,
token_loss_sums, backward, clipping, the fused AdamW build_optimizer makes). The optimizer's moments exist
from the first step on: they are created before the measured step by an optimizer step over zero gradients.
"""

import functools

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import MixedPrecisionPolicy

from lemur_torch import attention
from lemur_torch.batch import document_lengths
from lemur_torch.config import load_config
from lemur_torch.model import build_meta_model, init_weights, reset_rope_buffers, token_loss_sums
from lemur_torch.optim import build_optimizer
from lemur_torch.parallel.fsdp import apply_fsdp
from lemur_torch.plan import memory
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape

# MemTracker's module tracking warns about checkpoint_wrapper's re-entered forward; the byte counts are unaffected
pytestmark = pytest.mark.filterwarnings("ignore:The module hierarchy tracking")

MID = [
    "model.hidden_size=384",
    "model.intermediate_size=1024",
    "model.num_hidden_layers=4",
    "model.num_attention_heads=6",
    "model.num_key_value_heads=2",
]
MODELS = {
    "tiny": ["model=tiny"],
    "mid": ["model=tiny", *MID],
    # a small vocabulary: the layers' activations, not the logits, make the peak (inside a layer's backward)
    "mid_small_vocab": ["model=tiny", *MID, "model.vocab_size=2048"],
}


def measured_peak(cfg, mesh, micro_batch: int, seq_len: int) -> int:
    torch.manual_seed(0)
    model = build_meta_model(cfg.model)
    attention.install(model, attention.select(str(cfg.model.attention), "cpu", torch.float32))
    apply_fsdp(model, mesh, cfg.parallel, MixedPrecisionPolicy())
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, 0, cfg.model.initializer_range)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    ids = torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len))
    positions = torch.arange(seq_len).expand(micro_batch, seq_len)
    batch = {"input_ids": ids, "position_ids": positions, "doc_lens": document_lengths(positions)}
    batch = attention.with_varlen_boundaries(batch)
    domains = torch.zeros_like(ids)

    def step():
        logits = model(**attention.forward_kwargs(batch)).logits
        loss, _, _ = token_loss_sums(logits, ids, domains, 1, cfg.train.loss_chunk)
        (loss / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for p in model.parameters():  # the optimizer's moments, as after a first step, without running one
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return sum(per_device["Total"] for per_device in tracker.get_tracker_snapshot("peak").values())


def config(model: str, ac: str):
    # a loss chunk shorter than the sequence where the logits matter: the chunks' fp32 copies and gradients
    return load_config([*MODELS[model], f"parallel.activation_checkpointing={ac}", "train.loss_chunk=128"])


@functools.lru_cache(maxsize=None)
def measure(mesh, model: str, micro_batch: int, seq_len: int, ac: str) -> int:
    """measured_peak, once per case in this module (the checkpointing test reuses the prediction test's)."""
    return measured_peak(config(model, ac), mesh, micro_batch, seq_len)


def predicted_peak(cfg, micro_batch: int, seq_len: int) -> float:
    shape = ModelShape.from_model_config(cfg.model)
    setting = Setting(
        seq_len=seq_len,
        micro_batch=micro_batch,
        grad_accum=1,
        ac=str(cfg.parallel.activation_checkpointing),
        param_dtype="fp32",
        loss_chunk=cfg.train.loss_chunk,
        attention="sdpa",
        sharded=False,
        optimizer_foreach=False,  # build_optimizer's fused AdamW (the FSDP backend's): no per-parameter temporaries
    )
    return memory.estimate(shape, setting, shape.total_params, cuda_runtime=False, devices=1).peak


@pytest.mark.parametrize(
    "model, micro_batch, seq_len, ac",
    [
        ("tiny", 1, 256, "none"),
        ("tiny", 4, 256, "full"),
        ("mid", 2, 256, "none"),
        ("mid", 3, 256, "full"),
        ("mid_small_vocab", 4, 256, "full"),
        ("mid_small_vocab", 4, 256, "none"),
        ("tiny", 2, 256, "selective"),
        ("mid", 2, 256, "selective"),
        ("mid_small_vocab", 4, 256, "selective"),
    ],
)
def test_predicted_peak_memory_matches_measured(one_rank_mesh, model, micro_batch, seq_len, ac):
    cfg = config(model, ac)
    measured = measure(one_rank_mesh, model, micro_batch, seq_len, ac)
    predicted = predicted_peak(cfg, micro_batch, seq_len)
    print(
        f"{model} mb {micro_batch} seq {seq_len} AC {ac}: predicted {predicted / 2**20:.1f} MiB, "
        f"measured {measured / 2**20:.1f} MiB, ratio {predicted / measured:.3f}"
    )
    assert abs(predicted / measured - 1) <= 0.15


def test_selective_checkpointing_keeps_less_than_none_more_than_full(one_rank_mesh):
    """parallel.activation_checkpointing=selective in the trainer's own layers (apply_fsdp): the step's measured
    peak lies between no checkpointing and full checkpointing, on a model whose layers make the peak."""
    peaks = {ac: measure(one_rank_mesh, "mid_small_vocab", 4, 256, ac) for ac in ("none", "selective", "full")}
    print({ac: f"{v / 2**20:.1f} MiB" for ac, v in peaks.items()})
    assert peaks["none"] > peaks["selective"] > peaks["full"]
