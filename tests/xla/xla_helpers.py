"""Shared by the XLA lane's test files (each runs in its own process): the runs they check, produced once per
lane in $LEMUR_XLA_ARTIFACTS and reused by later files and by the main-lane checks (tests/xla/main_lane)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

from conftest import losses, read_metrics, subprocess_env  # tests/conftest.py  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 10
# the tiny Llama (2 of its 4 layers: compile time grows with depth, and nothing here needs more) with the
# real tokenizer; 4 rows per micro-batch (one per fsdp device), 2 micro-batches per step
LAYERS = 2
BASE = [
    "model=tiny",
    f"model.num_hidden_layers={LAYERS}",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_tokens=512",
    "optim.warmup_steps=3",
    "optim.lr=1e-3",
    f"train.max_steps={STEPS}",
    "log.wandb_mode=disabled",
    "log.console=false",
    "eval.every_steps=0",  # validation under XLA has its own run (test_xla_validation.py)
]
# no persistent compilation cache by default (the CPU client cannot load its own cached executables; see
# test_xla_resume.py): only the full run and its resumption use one
XLA = ["parallel=xla_spmd", "parallel.mixed_precision=fp32", "parallel.xla_cache_dir=null", *BASE]


def artifacts() -> str:
    """run.sh sets LEMUR_XLA_ARTIFACTS (fresh per lane run); a bare pytest gets a folder of its own."""
    if not os.environ.get("LEMUR_XLA_ARTIFACTS"):
        os.environ["LEMUR_XLA_ARTIFACTS"] = tempfile.mkdtemp(prefix="lemur-xla-")
    return os.environ["LEMUR_XLA_ARTIFACTS"]


def xla_env() -> Dict[str, str]:
    env = subprocess_env()
    env.setdefault("PJRT_DEVICE", "CPU")
    env.setdefault("CPU_NUM_DEVICES", "4")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def driver_cmd(results: str, overrides: List[str]) -> List[str]:
    return [sys.executable, os.path.join(HERE, "xla_driver.py"), results, *overrides]


def compile_cache() -> str:
    """The persistent compilation cache folder of the full run and its resumption (a host's own disk)."""
    return f"parallel.xla_cache_dir={os.path.join(artifacts(), 'xla-cache')}"


def run_xla(results: str, overrides: List[str], timeout: int = 600) -> Dict:
    """lemur-train with parallel=xla_spmd in a fresh process, measured by xla_driver.py."""
    cmd = driver_cmd(results, overrides)
    proc = subprocess.run(cmd, env=xla_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- "
            f"stderr\n{proc.stderr[-6000:]}"
        )
    with open(results) as f:
        return json.load(f)


def full_run() -> str:
    """The 10-step XLA run: checkpoints at 5 and 10 committed with the completion marker (as on gcsfuse), HF
    export and the model's logits at the end. Made once."""
    run_dir = os.path.join(artifacts(), "full")
    results = os.path.join(artifacts(), "full.json")
    if not os.path.exists(results):
        run_xla(
            results,
            [
                *XLA,
                compile_cache(),
                f"run_dir={run_dir}",
                "checkpoint.every_steps=5",
                "checkpoint.keep_last=3",
                "checkpoint.commit=marker",
                "checkpoint.export_at_end=true",
                f"checkpoint.export_dir={run_dir}/hf",
            ],
        )
    return run_dir


def full_results() -> Dict:
    full_run()
    with open(os.path.join(artifacts(), "full.json")) as f:
        return json.load(f)


def eager_reference(overrides: List[str]) -> Dict[int, Dict[str, float]]:
    """The plain reference: one process, unsharded, eager CPU, HF's own SDPA and packed-sequence masks; the
    same config, data, init and optimizer, without the trainer or any backend. step -> {"loss": global loss,
    "loss/<domain>": that domain's token-weighted loss}, like the trainer's metrics.jsonl."""
    import torch

    from lemur_torch.config import load_config
    from lemur_torch.data import build_loader
    from lemur_torch.model import (
        batch_label_tokens,
        build_meta_model,
        init_weights,
        reset_rope_buffers,
        token_loss_sums,
    )
    from lemur_torch.optim import build_optimizer, build_scheduler
    from lemur_torch.parallel.base import grad_accum_steps
    from lemur_torch.tokenizer import load_tokenizer

    cfg = load_config([o for o in overrides if not o.startswith("parallel")])
    t = cfg.train
    loader = build_loader(cfg.data, load_tokenizer(cfg.data.tokenizer), t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    if cfg.model.pretrained:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(
            AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, dtype=torch.float32).state_dict()
        )
    else:
        init_weights(model, t.seed, cfg.model.initializer_range)
    model.train()
    opt = build_optimizer(model, cfg.optim, "cpu")
    sched = build_scheduler(opt, cfg.optim, t.max_steps)
    batches, accum, domains = iter(loader), grad_accum_steps(cfg, 1), list(loader.domain_names)
    out = {}
    for step in range(1, t.max_steps + 1):
        micro = [next(batches) for _ in range(accum)]
        n = sum(batch_label_tokens(mb) for mb in micro).float().clamp(min=1.0)
        total, dom_sum, dom_cnt = 0.0, torch.zeros(len(domains)), torch.zeros(len(domains))
        for mb in micro:
            logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            # per-domain sums by plain masking, independently of the trainer's one-hot products
            per_tok = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), mb["labels"][:, 1:].flatten(), ignore_index=-100, reduction="none"
            )
            dom = mb["domain_ids"][:, 1:].flatten()
            valid = mb["labels"][:, 1:].flatten() != -100
            for i in range(len(domains)):
                dom_sum[i] += per_tok[(dom == i) & valid].sum().item()
                dom_cnt[i] += ((dom == i) & valid).sum().item()
            s, _, _ = token_loss_sums(logits, mb["labels"], mb["domain_ids"], len(domains), t.loss_chunk)
            (s / n).backward()
            total += s.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        out[step] = {
            "loss": total / n.item(),
            **{f"loss/{d}": (dom_sum[i] / dom_cnt[i]).item() for i, d in enumerate(domains) if dom_cnt[i] > 0},
        }
    return out


def eager_reference_losses(overrides: List[str]) -> Dict[int, float]:
    return {step: m["loss"] for step, m in eager_reference(overrides).items()}


def assert_matches_reference(
    run_dir: str, ref: Dict[int, Dict[str, float]], steps: List[int], tol: float = 1e-4
) -> None:
    """The run's loss and per-domain losses at `steps` equal the reference's within `tol`."""
    got = {m["step"]: m for m in read_metrics(run_dir)}
    assert sorted(s for s in got if s in steps) == sorted(steps), (sorted(got), steps)
    for step in steps:
        for key, value in ref[step].items():
            assert got[step].get(key) is not None, (step, key)
            assert abs(got[step][key] - value) < tol, (step, key, got[step][key], value)
