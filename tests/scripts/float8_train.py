"""A plain training loop of the tiny model with or without float8 (1 process, or under torchrun with gloo).

The project's parts, without the Trainer: build_meta_model -> float8.convert -> apply_fsdp (activation
checkpointing, compile, fully_shard: the backend's own function) -> to_empty -> init_weights; the built-in data
through build_loader; the loss from token_loss_sums over the global label-token count; AdamW from
build_optimizer; the float8 hook after every optimizer step. `train()` is imported by tests/test_float8.py for
one-process runs; `python float8_train.py --recipes none,rowwise --out f.json` runs them under torchrun and
writes the results (a list) as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

from lemur_torch import attention
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.model import build_meta_model, init_weights, reset_rope_buffers, token_loss_sums
from lemur_torch.optim import build_optimizer
from lemur_torch.parallel import float8
from lemur_torch.parallel.fsdp import apply_fsdp
from lemur_torch.tokenizer import build_tokenizer

OVERRIDES = ["model=tiny", "optim.lr=1e-3", "optim.warmup_steps=5", "train.seed=1234"]
GATHERED: Dict[str, int] = {}  # dtype -> weights FSDP2 all-gathered through torchao's float8 hook


def train(
    recipe: str,
    steps: int,
    seq_len: int = 64,
    micro_batch: int = 2,
    compile: bool = False,
    ac: str = "none",
    bf16: bool = False,
    save_dir: Optional[str] = None,
    load_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """Train `steps` optimizer steps (one micro-batch per rank each); returns the losses and what was converted.
    `load_dir`: start from that DCP checkpoint; `save_dir`: write the end state there as the backend would (DCP,
    plain tensors, HF keys) plus `weights.pt`, the full weights to compare with. Joins a gloo process group
    (torchrun's, or a 1-rank one it leaves again)."""
    own_group = not dist.is_initialized()
    if own_group:
        if "RANK" in os.environ:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return _train(recipe, steps, seq_len, micro_batch, compile, ac, bf16, save_dir, load_dir)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(recipe, steps, seq_len, micro_batch, compile, ac, bf16, save_dir, load_dir) -> Dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(
        [
            *OVERRIDES,
            f"train.seq_len={seq_len}",
            f"train.micro_batch_size={micro_batch}",
            f"parallel.compile={str(compile).lower()}",
            f"parallel.activation_checkpointing={ac}",
        ]
    )
    torch.manual_seed(cfg.train.seed)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    shard = world > 1 or bf16  # apply_fsdp's own rule
    model = build_meta_model(cfg.model)
    attention.install(model, attention.select("sdpa", "cpu", mp.param_dtype or torch.float32))
    conversion = float8.convert(model, float8.select(recipe, "cpu"), all_gather=shard)
    if conversion.all_gather:
        _count_float8_all_gathers()
    apply_fsdp(model, mesh, cfg.parallel, mp)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, cfg.train.seed, cfg.model.initializer_range)
    if load_dir:
        state = float8.plain_state_dict(get_model_state_dict(model))
        dcp.load(state, checkpoint_id=load_dir)
        set_model_state_dict(model, state)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    loader = build_loader(cfg.data, build_tokenizer(cfg.data), seq_len, micro_batch, rank, world, cfg.train.seed)
    batches = iter(loader)
    losses: List[float] = []
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warmup, then constant
            group["lr"] = cfg.optim.lr * min(1.0, (step + 1) / cfg.optim.warmup_steps)
        batch = attention.with_varlen_boundaries(next(batches))
        tokens = (batch["labels"][:, 1:] != -100).sum().float()
        dist.all_reduce(tokens)
        logits = model(**attention.forward_kwargs(batch)).logits
        loss_sum, _, _ = token_loss_sums(logits, batch["labels"], batch["domain_ids"], 2, cfg.train.loss_chunk)
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        conversion.after_optimizer_step(model)
        reduced = loss_sum.detach().clone()
        dist.all_reduce(reduced)
        losses.append((reduced / tokens).item())
    state = get_model_state_dict(model)
    plain = float8.plain_state_dict(state)
    optim_state = get_optimizer_state_dict(model, optimizer)["state"]
    result = {
        "world_size": world,
        "recipe": recipe,
        "losses": losses,
        "converted": conversion.converted,
        "eligible": conversion.eligible,
        "linears": conversion.linears,
        "all_gather": conversion.all_gather,
        "describe": conversion.describe(),
        "state_keys": sorted(state),
        "plain_types": sorted({_local_type(v) for v in plain.values()}),
        "raw_types": sorted({_local_type(v) for v in state.values()}),
        "optim_types": sorted({_local_type(t) for s in optim_state.values() for t in s.values() if t.dim()}),
        "float8_all_gathers": dict(GATHERED),
        "compiled_layers": sum(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.layers),
        "checkpointed_layers": sum(hasattr(layer, "_checkpoint_wrapped_module") for layer in model.model.layers),
        "precomputed_scales": sum(
            getattr(_local(p), "_precomputed_scale", None) is not None for p in model.parameters()
        ),
    }
    if save_dir:
        dcp.save(plain, checkpoint_id=save_dir)
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in plain.items()}
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in full.items()}, os.path.join(save_dir, "weights.pt"))
    GATHERED.clear()
    return result


@functools.lru_cache(maxsize=1)
def _count_float8_all_gathers() -> None:
    """Count what FSDP2 all-gathers through torchao's float8 weight hook, by dtype (proof the float8 path ran)."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    hook = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather

    @functools.wraps(hook)  # FSDP2 checks the hook's signature
    def counted(self, *args, **kwargs):
        out = hook(self, *args, **kwargs)
        dtype = str(out[0][0].dtype)
        GATHERED[dtype] = GATHERED.get(dtype, 0) + 1
        return out

    WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather = counted


def _local(value):
    return value._local_tensor if hasattr(value, "_local_tensor") else value


def _local_type(value: torch.Tensor) -> str:
    return type(_local(value)).__name__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="none", help="comma-separated; trained one after the other")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--ac", default="none")
    ap.add_argument("--save-dir", help="each recipe's end state goes to SAVE_DIR/<recipe>")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    results = []
    for recipe in args.recipes.split(","):
        save = os.path.join(args.save_dir, recipe) if args.save_dir else None
        results.append(train(recipe, args.steps, compile=args.compile, ac=args.ac, bf16=args.bf16, save_dir=save))
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
