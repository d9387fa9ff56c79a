"""Trainer overhead: lemur-torch's full loop vs a bare PyTorch loop vs HF Trainer, same model, same batches.

All three train the tiny Llama (same init) on the same pre-built packed batches for the same number of steps
in this one process, interleaved over `--rounds` rounds; each variant's best round is reported. lemur-torch
runs its real Trainer.fit (FSDP2 on a 1-rank gloo group, token-count all-reduce, clipping, non-finite guard,
per-domain loss, metrics.jsonl logging); the bare loop does forward, loss, backward, AdamW step, nothing else,
with the same attention semantics: the document-causal [B, 1, S, S] mask lemur's `sdpa` builds on the CPU,
given to the HF model as its 4-D attention mask (a plain causal loop would compare different attention), and
the same AdamW (lemur_torch.optim.build_optimizer).
Prints tokens/s for each and the ratios; writes bench/results/trainer_overhead.json.
Target: lemur-torch / bare >= 0.97.
`--smoke`: 2 steps of 2 x 64 tokens, one round, written to trainer_overhead.smoke.json (bench/results_io.py).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from results_io import TESTS, write_result  # bench/ is on sys.path: this script's folder

from lemur_torch.attention import document_causal_mask
from lemur_torch.batch import IGNORE_INDEX, row_document_ids
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.metrics import MetricsLogger
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.parallel.fsdp import FsdpBackend
from lemur_torch.tokenizer import load_tokenizer
from lemur_torch.trainer import Trainer

sys.path.insert(0, TESTS)
from fakes import ListLoader, tiny_model  # noqa: E402  (the tests' fake loader: every variant sees the same batches)


def make_batches(cfg, n):
    loader = build_loader(
        cfg.data,
        load_tokenizer(cfg.data.tokenizer),
        cfg.train.seq_len,
        cfg.train.micro_batch_size,
        0,
        1,
        cfg.train.seed,
    )
    it = iter(loader)
    return [next(it) for _ in range(n)], list(loader.domain_names)


def run_lemur(cfg, batches, domains, steps):
    cfg.train.max_steps = steps
    backend = FsdpBackend(cfg)
    model = backend.setup_model(cfg)
    opt = build_optimizer(model, cfg.optim, "cpu")
    sched = build_scheduler(opt, cfg.optim, steps)
    logger = MetricsLogger(cfg, enabled=True)
    trainer = Trainer(cfg, backend, model, opt, sched, ListLoader(batches, domains), Checkpointer(cfg, backend), logger)
    t0 = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t0
    logger.close()
    return elapsed


def run_bare(cfg, batches, steps):
    model = tiny_model(cfg)
    opt = build_optimizer(model, cfg.optim, "cpu")
    accum = cfg.train.global_batch_tokens // (cfg.train.micro_batch_size * cfg.train.seq_len)
    t0 = time.perf_counter()
    for step in range(steps):
        for i in range(accum):
            b = batches[(step * accum + i) % len(batches)]
            mask = document_causal_mask(row_document_ids(b["position_ids"]))  # lemur's attention, per forward
            logits = model(
                input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=mask, use_cache=False
            ).logits
            targets = F.pad(b["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # shift labels, not logits (as HF does)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
            (loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_hf_trainer(cfg, batches, steps, out_dir):
    # HF Trainer pulls in accelerate and datasets: only this variant pays for the import
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = [
        {k: b[k][i].tolist() for k in ("input_ids", "labels", "position_ids")}
        for b in batches
        for i in range(b["input_ids"].shape[0])
    ]
    accum = cfg.train.global_batch_tokens // (cfg.train.micro_batch_size * cfg.train.seq_len)
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.train.grad_clip,
        warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=cfg.train.seed,
    )
    trainer = Trainer(model=tiny_model(cfg), args=args, train_dataset=Dataset.from_list(rows))
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 steps of 2 x 64 tokens, one round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds = 2, 1
    tmp = tempfile.mkdtemp(prefix="bench_overhead_")
    sizes = ["train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_tokens=128"]
    overrides = [
        "model=tiny",
        *(sizes if args.smoke else ["train.seq_len=256", "train.micro_batch_size=4", "train.global_batch_tokens=2048"]),
        "log.wandb_mode=disabled",
        "log.console=false",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        "checkpoint.export_at_end=false",
        "checkpoint.resume=none",
        f"run_dir={tmp}/lemur",
    ]
    cfg = load_config(overrides)
    accum = cfg.train.global_batch_tokens // (cfg.train.micro_batch_size * cfg.train.seq_len)
    batches, domains = make_batches(cfg, args.steps * accum)
    tokens = args.steps * cfg.train.global_batch_tokens
    best = {"lemur": float("inf"), "bare": float("inf"), "hf_trainer": float("inf")}
    for r in range(args.rounds):
        best["bare"] = min(best["bare"], run_bare(cfg, batches, args.steps))
        best["lemur"] = min(best["lemur"], run_lemur(load_config(overrides), batches, domains, args.steps))
        if not args.skip_hf:
            best["hf_trainer"] = min(best["hf_trainer"], run_hf_trainer(cfg, batches, args.steps, f"{tmp}/hf{r}"))
    tps = {k: tokens / v for k, v in best.items() if v != float("inf")}
    result = {
        "benchmark": "trainer_overhead",
        "steps": args.steps,
        "tokens_per_step": cfg.train.global_batch_tokens,
        "rounds": args.rounds,
        "tokens_per_s": tps,
        "ratio_lemur_over_bare": tps["lemur"] / tps["bare"],
        "ratio_lemur_over_hf_trainer": tps["lemur"] / tps["hf_trainer"] if "hf_trainer" in tps else None,
        "target_lemur_over_bare": 0.97,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    for k, v in tps.items():
        print(f"{k:>11}: {v:9.1f} tokens/s")
    print(f"lemur / bare       = {result['ratio_lemur_over_bare']:.3f}  (target >= 0.97)")
    if result["ratio_lemur_over_hf_trainer"]:
        print(f"lemur / HF Trainer = {result['ratio_lemur_over_hf_trainer']:.3f}")
    write_result("trainer_overhead", result, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
