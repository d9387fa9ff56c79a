"""Validation during training: what building the validation set costs as lanes and ranks grow, and what an
evaluation costs next to training.

1. Build cost. A generated JSON-lines source (--mb MB, 5% held out); per source eval.batches=1 of 64 rows x 1024
   tokens. For data.lanes in 12, 128, 1024: bytes the validation reader reads / bytes of text it evaluates (one
   rank builds everything). For 1024 lanes and 1, 8, 64 data-parallel ranks: what rank 0 reads and how long it
   takes, and the bytes all ranks read together, beside the alternative where every rank reads the slice with
   one reader (each rank W times the single-reader bytes in total).
2. Evaluation cost. On the tiny model, one validation micro-batch (forward + loss under no_grad, eval mode) vs one
   training micro-step (forward + loss + backward) of the same shape, interleaved over --rounds rounds, best of
   each: the ratio is what a validation batch costs in training-step units.
Prints the figures and writes bench/results/validation.json (`--smoke`: a 1 MB source, 12 lanes, 1 and 2 ranks,
short rows, one round: validation.smoke.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

import torch
from results_io import TESTS, write_result  # bench/ is on sys.path: this script's folder

from lemur_torch.attention import forward_kwargs, with_varlen_boundaries
from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.data.heldout import apportion, rank_rows
from lemur_torch.model import build_meta_model, init_weights, reset_rope_buffers, token_loss_sums
from lemur_torch.tokenizer import load_tokenizer
from lemur_torch.validation import Validator

sys.path.insert(0, TESTS)
from fakes import HostBackend  # noqa: E402  (the tests' one-process stand-in for a backend)

WORDS = [w for w in open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read().split() if w.isalpha()]


def corpus(path: str, mb: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        i = 0
        while f.tell() < mb * 1_000_000:
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(50, 400)))}) + "\n")
            i += 1


# sizes of the full run, and of `--smoke` (seconds: one small lane count, two ranks, short rows)
FULL = {"lanes": (12, 128, 1024), "ranks": (1, 8, 64), "seq_len": 1024, "micro": 4, "batch_tokens": 65536}
SMOKE = {"lanes": (12,), "ranks": (1, 2), "seq_len": 128, "micro": 2, "batch_tokens": 256}


def overrides(path: str, lanes: int, sizes: dict):
    return [
        "model=tiny",
        "~data.sources.pydoc_text",
        "data.sources.stdlib_code.kind=jsonl",
        f"data.sources.stdlib_code.path={path}",
        "data.sources.stdlib_code.holdout=0.05",
        f"data.lanes={lanes}",
        f"train.seq_len={sizes['seq_len']}",
        f"train.micro_batch_size={sizes['micro']}",
        f"train.global_batch_tokens={sizes['batch_tokens']}",
        "eval.every_steps=100",
        "eval.batches=1",
    ]


def evaluated_bytes(tok, v) -> int:
    """UTF-8 bytes of the text in the validation rows (padding left out)."""
    n = 0
    for b in v.batches:
        for r in range(b["input_ids"].shape[0]):
            if int(b["domain_ids"][r, 0]) < len(v.names):
                ids, labels = b["input_ids"][r], b["labels"][r]
                n += len(tok.decode(ids[~((ids == 0) & (labels == IGNORE_INDEX))], skip_special_tokens=True).encode())
    return n


def build_costs(tok, path: str, sizes: dict) -> dict:
    out = {"lanes": {}, "ranks": {}}
    S, B = sizes["seq_len"], sizes["micro"]
    for lanes in sizes["lanes"]:
        cfg = load_config(overrides(path, lanes, sizes))
        loader = build_loader(cfg.data, tok, S, B, 0, 1, 0)
        t0 = time.perf_counter()
        v = Validator(cfg, loader, HostBackend(), info=lambda line: None)
        seconds = time.perf_counter() - t0
        text = evaluated_bytes(tok, v)
        out["lanes"][lanes] = {
            "read_bytes": v.read_bytes[0],
            "evaluated_bytes": text,
            "read_per_evaluated": v.read_bytes[0] / text,
            "build_s": seconds,
        }
        held = sum(p.weight for p in loader.sources[0]._held_pieces)
        out["held_out_bytes"] = held
        print(
            f"lanes {lanes:5d}: read {v.read_bytes[0] / 1e6:6.2f} MB of the {held / 1e6:.1f} MB held-out slice for "
            f"{text / 1e6:5.2f} MB of evaluated text ({v.read_bytes[0] / text:.2f}x), built in {seconds:.2f}s on "
            "one rank",
            flush=True,
        )
    lanes = sizes["lanes"][-1]
    cfg = load_config(overrides(path, lanes, sizes))
    loader = build_loader(cfg.data, tok, S, B, 0, 1, 0)
    v = Validator(cfg, loader, HostBackend(), info=lambda line: None)
    quotas = [apportion(v.requested, v.sources[0].lane_weights(lanes))]
    single = None
    for ranks in sizes["ranks"]:
        per_rank = []
        for r in range(ranks):
            t0 = time.perf_counter()
            read = rank_rows(loader, v.sources, quotas, r, ranks)[3][0]
            per_rank.append((read, time.perf_counter() - t0))
        single = single or per_rank[0][0]
        top = max(per_rank)
        total = sum(b for b, _ in per_rank)
        out["ranks"][ranks] = {
            "max_rank_read_bytes": top[0],
            "max_rank_build_s": max(s for _, s in per_rank),
            "all_ranks_read_bytes": total,
            "every_rank_reads_all_bytes": ranks * single,
        }
        print(
            f"ranks {ranks:3d} ({lanes} lanes): the busiest rank reads {top[0] / 1e6:6.3f} MB, builds in at most "
            f"{max(s for _, s in per_rank):.2f}s; all ranks read {total / 1e6:.2f} MB together, vs "
            f"{ranks * single / 1e6:.2f} MB if every rank read the slice itself",
            flush=True,
        )
    return out


def eval_vs_train(tok, rounds: int) -> dict:
    cfg = load_config(["model=tiny", "train.seq_len=256", "train.micro_batch_size=4"])
    loader = build_loader(cfg.data, tok, 256, 4, 0, 1, 0)
    batch = with_varlen_boundaries(next(iter(loader)))  # as the FSDP backend hands it to the model
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, 0, cfg.model.initializer_range)
    n = len(loader.domain_names)

    def train_micro_step():
        s, _, _ = token_loss_sums(model(**forward_kwargs(batch)).logits, batch["labels"], batch["domain_ids"], n, 1024)
        s.backward()
        model.zero_grad(set_to_none=True)

    def validation_micro_batch():
        model.eval()
        with torch.no_grad():
            token_loss_sums(model(**forward_kwargs(batch)).logits, batch["labels"], batch["domain_ids"], n, 1024)
        model.train()

    best = {"train": float("inf"), "validation": float("inf")}
    for _ in range(rounds):
        for name, fn in (("train", train_micro_step), ("validation", validation_micro_batch)):
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / 3)
    ratio = best["validation"] / best["train"]
    print(
        f"tiny model, 4 x 256 tokens: training micro-step {best['train'] * 1e3:.1f} ms, validation micro-batch "
        f"{best['validation'] * 1e3:.1f} ms: validation / training = {ratio:.2f}",
        flush=True,
    )
    return {**best, "validation_per_train": ratio}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="seconds: a 1 MB source, 12 lanes, 2 ranks, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.mb, args.rounds = 1, 1
    tok = load_tokenizer("builtin")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "corpus.jsonl")
        corpus(path, args.mb)
        build = build_costs(tok, path, SMOKE if args.smoke else FULL)
    result = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "corpus_mb": args.mb,
        "build": build,
        "evaluation": eval_vs_train(tok, args.rounds),
    }
    write_result("validation", result, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
