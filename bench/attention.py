"""Attention implementations side by side on the same packed batches: sdpa, flex and flash.

CPU section (always): the tiny model and a mid-size one (768 hidden, 6 layers, GQA 12/4 heads, 1024-token
rows), on packed batches from the built-in corpus, each implementation timed on the same batches, interleaved
over `--rounds` rounds, best round kept:
- forward (no grad): sdpa, flex with its real compiled kernel, flash with the CPU reference kernel;
- training step (forward + backward): sdpa, flash and flex with their CPU reference kernels (FlexAttention
  has no CPU backward).
Printed as ratios to sdpa. The reference kernels are plain per-document torch code, there to run the whole
path on CPU, not to be fast: their ratios say what the contract costs around them on CPU, nothing about GPUs.

GPU section (only where CUDA is present): the same implementations with their real kernels (flash-attn or
torch's varlen attention, compiled FlexAttention, SDPA with the document mask) on 4 decoder layers of
Llama-2-7B's shape in bf16 at 4096 tokens per row; prints step time, the attention share of the step (the
same step with attention replaced by a no-op, subtracted) and the MFU against metrics.PEAK_FLOPS. Without
CUDA it says it did not run and writes no GPU figure.

Writes bench/results/attention.json (`--smoke`: the CPU section on a one-layer tiny model, 2 x 64 tokens, one batch,
one round, and the GPU section at one layer: attention.smoke.json).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from results_io import write_result  # bench/ is on sys.path: this script's folder

from lemur_torch import attention
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.metrics import peak_flops
from lemur_torch.model import build_meta_model, flops_per_token, init_weights, reset_rope_buffers
from lemur_torch.tokenizer import load_tokenizer

MID = [
    "model.hidden_size=768",
    "model.intermediate_size=2048",
    "model.num_hidden_layers=6",
    "model.num_attention_heads=12",
    "model.num_key_value_heads=4",
]


def packed_batches(cfg, n, device):
    loader = build_loader(
        cfg.data, load_tokenizer(cfg.data.tokenizer), cfg.train.seq_len, cfg.train.micro_batch_size, 0, 1, 0
    )
    it = iter(loader)
    out = []
    for _ in range(n):
        b = attention.with_varlen_boundaries(next(it))
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
    return out


def model_for(cfg, selection, device, dtype):
    model = build_meta_model(cfg.model)
    attention.install(model, selection)
    model.to_empty(device=device)
    reset_rope_buffers(model, torch.device(device))
    init_weights(model, 0, cfg.model.initializer_range)
    return model.to(dtype)


def timed(model, batches, train: bool, device) -> float:
    """Seconds per batch over the batches (after one warm-up batch, which also compiles)."""

    def one(b):
        if train:
            model(**attention.forward_kwargs(b)).logits.float().mean().backward()
        else:
            with torch.no_grad():
                model(**attention.forward_kwargs(b))

    one(batches[0])
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        one(b)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def cpu_section(rounds: int, n_batches: int, smoke: bool = False):
    cases = {
        "forward": {
            "sdpa": attention.Selection("sdpa", None, ""),
            # the smoke run skips the CPU compile (seconds of it; tests/test_attention.py runs the compiled kernel)
            "flex": attention.Selection("flex", attention.FLEX_REFERENCE if smoke else attention.COMPILED_FLEX, ""),
            "flash_reference": attention.Selection("flash", attention.VARLEN_REFERENCE, ""),
        },
        "train_step": {
            "sdpa": attention.Selection("sdpa", None, ""),
            "flex_reference": attention.Selection("flex", attention.FLEX_REFERENCE, ""),
            "flash_reference": attention.Selection("flash", attention.VARLEN_REFERENCE, ""),
        },
    }
    sizes = [
        ("tiny", ["model=tiny", "train.seq_len=256", "train.micro_batch_size=4"]),
        ("mid", ["model=tiny", *MID, "train.seq_len=1024", "train.micro_batch_size=2"]),
    ]
    if smoke:
        sizes = [("tiny", ["model=tiny", "model.num_hidden_layers=1", "train.seq_len=64", "train.micro_batch_size=2"])]
    out = {}
    for name, overrides in sizes:
        cfg = load_config(overrides)
        batches = packed_batches(cfg, n_batches, "cpu")
        docs = sum(len(b["cu_seqlens"]) - 1 for b in batches) / len(batches)
        res = {"seq_len": cfg.train.seq_len, "micro_batch": cfg.train.micro_batch_size, "documents_per_batch": docs}
        for mode, sels in cases.items():
            models = {k: model_for(cfg, s, "cpu", torch.float32) for k, s in sels.items()}
            best = {k: float("inf") for k in sels}
            for _ in range(rounds):
                for k, m in models.items():
                    best[k] = min(best[k], timed(m, batches, mode == "train_step", "cpu"))
            res[mode] = {"seconds_per_batch": best, "ratio_to_sdpa": {k: v / best["sdpa"] for k, v in best.items()}}
            print(
                f"{name:>4} {mode:>10}: "
                + "  ".join(f"{k} {v * 1e3:8.1f} ms ({v / best['sdpa']:.2f}x)" for k, v in best.items())
            )
        out[name] = res
    return out


def gpu_section(rounds: int, n_batches: int, smoke: bool = False):
    if not torch.cuda.is_available():
        print("GPU section: not run (no CUDA device here); no GPU figure is written")
        return None, "not run: no CUDA device"
    layers = 1 if smoke else 4
    cfg = load_config(
        ["model=llama2_7b", f"model.num_hidden_layers={layers}", "train.seq_len=4096", "train.micro_batch_size=1"]
    )
    batches = packed_batches(cfg, n_batches, "cuda")
    device_name = torch.cuda.get_device_name()
    peak = peak_flops("auto", device_name)
    tokens = cfg.train.seq_len * cfg.train.micro_batch_size
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    sels = {"sdpa": attention.Selection("sdpa", None, "")}
    for impl in ("flex", "flash"):
        kernel = attention.find_kernel(impl, "cuda")
        if kernel is not None:
            sels[f"{impl} ({kernel.name})"] = attention.Selection(impl, kernel, "")
    noop = attention.Kernel("noop", "no attention", lambda q, k, v, *a, **kw: q, attention.ALL_FLOATS)
    sels["no attention"] = attention.Selection("flash", noop, "")
    best = {k: float("inf") for k in sels}
    for _ in range(rounds):
        for k, s in sels.items():
            model = model_for(cfg, s, "cuda", torch.bfloat16)
            best[k] = min(best[k], timed(model, batches, True, "cuda"))
            del model
            torch.cuda.empty_cache()
    base = best.pop("no attention")
    res = {"device": device_name, "seq_len": cfg.train.seq_len, "layers": cfg.model.num_hidden_layers, "impls": {}}
    for k, t in best.items():
        entry = {
            "seconds_per_step": t,
            "attention_share": max(0.0, 1 - base / t),
            "tokens_per_s": tokens / t,
            "mfu": tokens / t * fpt / peak if peak else None,
        }
        res["impls"][k] = entry
        mfu = f"{100 * entry['mfu']:.1f}%" if entry["mfu"] is not None else "n/a"
        print(f"gpu {k}: {t * 1e3:.1f} ms/step, attention {100 * entry['attention_share']:.0f}% of the step, MFU {mfu}")
    return res, "measured"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="seconds: one layer, 2 x 64 tokens, one batch, one round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.batches = 1, 1
    torch.manual_seed(0)
    result = {
        "benchmark": "attention",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_section(args.rounds, args.batches, args.smoke),
    }
    result["gpu"], result["gpu_note"] = gpu_section(args.rounds, args.batches, args.smoke)
    write_result("attention", result, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
