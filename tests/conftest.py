"""Shared helpers: run lemur-train as a real subprocess (1 process, or torchrun with gloo) and read its metrics;
the session fixtures (the tokenizer, trained runs). Fakes shared by tests and bench are in fakes.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import pytest

from lemur_torch.tokenizer import load_tokenizer

# small but real: the tiny Llama with the 32000-piece tokenizer, 64-token rows, 256 tokens per step
FAST = [
    "model=tiny",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.global_batch_tokens=256",
    "optim.warmup_steps=5",
    "optim.lr=1e-3",
    "checkpoint.every_steps=0",
    "checkpoint.export_at_end=false",
    "log.wandb_mode=disabled",
    "log.console=false",
    "eval.every_steps=0",
]


def subprocess_env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_train(
    overrides: List[str],
    nproc: int = 1,
    check: bool = True,
    timeout: int = 600,
    extra_env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "lemur_torch.train", *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "lemur_torch.train",
            *overrides,
        ]
    env = subprocess_env()
    env.update(extra_env or {})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- "
            f"stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def children(pid: int) -> List[int]:
    """pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def read_metrics(run_dir: str) -> List[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(run_dir: str) -> Dict[int, float]:
    """step -> loss; a resumed run appends, and the latest line for a step wins (validation lines carry no loss)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tok():
    """The built-in 32000-piece tokenizer (the tiny model's vocabulary), loaded once per session."""
    return load_tokenizer("builtin")


# -- trained runs shared by the evaluation tests (one of each per test session) -------------------------------


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> str:
    """A 4-step pretraining run of the tiny model with its checkpoint and HF export (run_dir/hf)."""
    run_dir = str(tmp_path_factory.mktemp("smoke_run") / "run")
    run_train([*FAST, "train.max_steps=4", f"run_dir={run_dir}", "checkpoint.export_at_end=true"])
    return run_dir


@pytest.fixture(scope="session")
def chat_smoke_run(tmp_path_factory) -> str:
    """A 2-step `experiment=chat_smoke` run: its export has the ChatML tokens and a chat_template."""
    run_dir = str(tmp_path_factory.mktemp("chat_smoke_run") / "run")
    run_train(
        [
            "experiment=chat_smoke",
            "train.max_steps=2",
            "train.seq_len=128",
            "train.global_batch_tokens=256",
            "checkpoint.every_steps=0",
            "log.wandb_mode=disabled",
            "log.console=false",
            f"run_dir={run_dir}",
        ]
    )
    return run_dir
