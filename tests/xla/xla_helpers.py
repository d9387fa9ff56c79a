"""Shared by the XLA lane's test files (each runs in its own process): the runs they check, produced once per
lane in $LEMUR_XLA_ARTIFACTS and reused by later files and by the main-lane checks (tests/xla/main_lane)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

from conftest import losses, subprocess_env  # tests/conftest.py  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 10
# the tiny Llama with the real tokenizer; 4 rows per micro-batch (one per fsdp device), 2 micro-batches per step
BASE = [
    "model=tiny", "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_tokens=512",
    "optim.warmup_steps=3", "optim.lr=1e-3", f"train.max_steps={STEPS}", "log.wandb_mode=disabled", "log.console=false",
    "eval.every_steps=0",  # validation under XLA has its own run (test_xla_validation.py)
]
XLA = ["parallel=xla_spmd", "parallel.mixed_precision=fp32", *BASE]


def artifacts() -> str:
    """run.sh sets LEMUR_XLA_ARTIFACTS (fresh per lane run); a bare pytest gets a folder of its own."""
    if not os.environ.get("LEMUR_XLA_ARTIFACTS"):
        os.environ["LEMUR_XLA_ARTIFACTS"] = tempfile.mkdtemp(prefix="lemur-xla-")
    return os.environ["LEMUR_XLA_ARTIFACTS"]


def run_xla(results: str, overrides: List[str], timeout: int = 600) -> Dict:
    """lemur-train with parallel=xla_spmd in a fresh process, measured by xla_driver.py."""
    env = subprocess_env()
    env.setdefault("PJRT_DEVICE", "CPU")
    env.setdefault("CPU_NUM_DEVICES", "4")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, os.path.join(HERE, "xla_driver.py"), results, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    with open(results) as f:
        return json.load(f)


def full_run() -> str:
    """The 10-step XLA run: checkpoints at 5 and 10, HF export and the model's logits at the end. Made once."""
    run_dir = os.path.join(artifacts(), "full")
    results = os.path.join(artifacts(), "full.json")
    if not os.path.exists(results):
        run_xla(results, [*XLA, f"run_dir={run_dir}", "checkpoint.every_steps=5", "checkpoint.keep_last=3",
                          "checkpoint.export_at_end=true", f"checkpoint.export_dir={run_dir}/hf"])
    return run_dir


def full_results() -> Dict:
    full_run()
    with open(os.path.join(artifacts(), "full.json")) as f:
        return json.load(f)


def eager_reference_losses(overrides: List[str]) -> Dict[int, float]:
    """The plain reference: one process, unsharded, eager CPU, HF's own SDPA and packed-sequence masks; the
    same config, data, init and optimizer, without the trainer or any backend."""
    import torch

    from lemur_torch.config import grad_accum_steps, load_config
    from lemur_torch.data import build_loader
    from lemur_torch.model import batch_label_tokens, build_meta_model, init_weights, reset_rope_buffers, token_loss_sums
    from lemur_torch.optim import build_optimizer, build_scheduler
    from lemur_torch.tokenizer import load_tokenizer

    cfg = load_config([o for o in overrides if not o.startswith("parallel")])
    t = cfg.train
    loader = build_loader(cfg.data, load_tokenizer(cfg.data.tokenizer), t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    if cfg.model.pretrained:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, dtype=torch.float32).state_dict())
    else:
        init_weights(model, t.seed, cfg.model.initializer_range)
    model.train()
    opt = build_optimizer(model, cfg.optim, "cpu")
    sched = build_scheduler(opt, cfg.optim, t.max_steps)
    batches, accum, n_dom = iter(loader), grad_accum_steps(cfg, 1), len(loader.domain_names)
    out = {}
    for step in range(1, t.max_steps + 1):
        micro = [next(batches) for _ in range(accum)]
        n = sum(batch_label_tokens(mb) for mb in micro).float().clamp(min=1.0)
        total = 0.0
        for mb in micro:
            logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            s, _, _ = token_loss_sums(logits, mb["labels"], mb["domain_ids"], n_dom, t.loss_chunk)
            (s / n).backward()
            total += s.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        out[step] = total / n.item()
    return out
