"""Float8 training step vs the same step without float8, side by side in one process.

Each variant is the FSDP backend's model with `parallel.float8` set (converted before activation checkpointing,
compile and fully_shard, as a run does) with the same init, trained on the same pre-built packed batches:
forward, the project's loss, backward, clipping, AdamW and the backend's hook after the optimizer step.
Variants: no float8, float8 rowwise, float8 tensorwise; interleaved over `--rounds` rounds, best round kept;
printed as ratios to the step without float8.

On CPU (this machine) the step without float8 is the CPU default, fp32, and float8 runs as torchao's emulation:
each float8 GEMM is replaced by a matmul of the dequantised operands, after the real casts and scales. That
checks the float8 path, not its speed: it does more work than the fp32 step by construction, and its ratio says
nothing about a GPU. On CUDA with float8 tensor cores (compute capability 8.9+) the same script compares real
float8 GEMMs with bf16 (mixed_precision=bf16).

Writes bench/results/float8.json. `--smoke`: the tiny model, 3 steps, one round (seconds).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch
from results_io import write_result  # bench/ is on sys.path: this script's folder

from lemur_torch import attention
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.model import token_loss_sums
from lemur_torch.optim import build_optimizer
from lemur_torch.parallel.fsdp import FsdpBackend
from lemur_torch.tokenizer import load_tokenizer

VARIANTS = ("none", "rowwise", "tensorwise")
MODELS = {
    "tiny": ["model=tiny"],
    # GEMM-bound enough on CPU for the matmul share to show: 768 hidden, 2048 MLP, 4 layers, 512-token rows
    "mid": [
        "model=tiny",
        "model.hidden_size=768",
        "model.intermediate_size=2048",
        "model.num_hidden_layers=4",
        "model.num_attention_heads=12",
        "model.num_key_value_heads=4",
    ],
}


def overrides(model: str, seq_len: int, cuda: bool, run_dir: str, recipe: str):
    return [
        f"parallel.float8={recipe}",
        *MODELS[model],
        f"train.seq_len={seq_len}",
        "train.micro_batch_size=2",
        f"train.global_batch_tokens={2 * seq_len}",
        f"parallel.mixed_precision={'bf16' if cuda else 'fp32'}",
        f"parallel.compile={str(cuda).lower()}",  # CPU: eager (compile is tested, and costs minutes here)
        "model.attention=sdpa",
        f"run_dir={run_dir}",
    ]


class Variant:
    def __init__(self, cfg):
        self.backend = FsdpBackend(cfg)
        self.model = self.backend.setup_model(cfg)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.backend.device.type)
        self.cfg = cfg

    def step(self, batch) -> float:
        b = self.backend
        logits = self.model(**attention.forward_kwargs(batch)).logits
        loss_sum, _, _ = token_loss_sums(logits, batch["labels"], batch["domain_ids"], 2, self.cfg.train.loss_chunk)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        (loss_sum / tokens).backward()
        b.clip_grad_norm_(self.model, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        b.after_optimizer_step(self.model)
        return loss_sum


def timed(variant: Variant, batches, cuda: bool) -> float:
    """Seconds per step over `batches` (after one warm-up step, which also compiles)."""
    variant.step(batches[0])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        variant.step(batch)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def bench_model(name: str, steps: int, rounds: int, seq_len: int, cuda: bool) -> dict:
    tmp = tempfile.mkdtemp(prefix="bench_float8_")
    cfgs = {recipe: load_config(overrides(name, seq_len, cuda, tmp, recipe)) for recipe in VARIANTS}
    cfg = cfgs["none"]
    loader = build_loader(cfg.data, load_tokenizer(cfg.data.tokenizer), seq_len, 2, 0, 1, cfg.train.seed)
    it = iter(loader)
    device = "cuda" if cuda else "cpu"
    batches = []
    for _ in range(steps):
        batch = attention.with_varlen_boundaries(next(it))
        batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    variants = {recipe: Variant(cfgs[recipe]) for recipe in VARIANTS}
    best = {recipe: float("inf") for recipe in VARIANTS}
    for _ in range(rounds):
        for recipe, variant in variants.items():
            best[recipe] = min(best[recipe], timed(variant, batches, cuda))
    tokens = 2 * seq_len
    result = {
        "model": name,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "step_s": best,
        "tokens_per_s": {r: tokens / s for r, s in best.items()},
        "ratio_to_plain": {r: best["none"] / s for r, s in best.items() if r != "none"},
        "float8": {r: v.backend.float8 for r, v in variants.items()},
    }
    plain = "bf16" if cuda else "fp32"
    print(f"{name} ({seq_len}-token rows x 2):")
    for recipe in VARIANTS:
        label = plain if recipe == "none" else f"float8 {recipe}"
        ratio = "" if recipe == "none" else f"  x{result['ratio_to_plain'][recipe]:.2f} of {plain}'s tokens/s"
        print(f"  {label:>18}: {result['tokens_per_s'][recipe]:9.1f} tokens/s{ratio}")
    for recipe in VARIANTS[1:]:
        print(f"  {result['float8'][recipe]}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, one round")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.steps, args.rounds = 3, 1
    models = [("tiny", 64)] if args.smoke else [("tiny", 256), ("mid", 512)]
    if cuda:
        print(f"CUDA ({torch.cuda.get_device_name()}): float8 GEMMs vs bf16")
    else:
        print(
            "CPU: float8 is emulated (each float8 GEMM replaced by a dequantised fp32 matmul after the real casts "
            "and scales): this checks the float8 path, not its speed; expect it slower than fp32 here"
        )
    results = [bench_model(name, args.steps, args.rounds, seq, cuda) for name, seq in models]
    write_result(
        "float8",
        {
            "benchmark": "float8",
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "emulated": not cuda,
            "note": "CPU: torchao emulation, which checks the float8 path, not its speed"
            if not cuda
            else "real float8 GEMMs vs bf16",
            "steps": args.steps,
            "rounds": args.rounds,
            "models": results,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
        smoke=args.smoke,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
