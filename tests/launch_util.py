"""Shared by the launch tests (tests/test_launch_*.py): the small training run they all use, how to start it
under a launcher, and the reference runs they compare with.

Every launcher must reproduce a plain run of the same config: one process (`python -m lemur_torch.train`) for
the loss-curve tolerance across world sizes, and two processes for the exact-resume checks. The references
are computed once per test session and shared.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import children

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
MAX_STEPS = 20

# tiny model, 64-token rows, 256 tokens per step: 4 micro-batches of 1 row on 1 rank, 2 on 2 ranks, 1 on 4, so
# every world size sees the same global batch; fp32 so curves are comparable across world sizes.
TRAIN_ARGS = [
    "experiment=smoke",
    f"train.max_steps={MAX_STEPS}",
    "train.seq_len=64",
    "train.micro_batch_size=1",
    "train.global_batch_tokens=256",
    "optim.warmup_steps=5",
    "parallel.mixed_precision=fp32",
    "checkpoint.every_steps=1000",
    "log.wandb_mode=disabled",
]


def train_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    # a launcher variable left in the caller's environment would change the run under test
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "NNODES",
        "NPROC_PER_NODE",
        "NODE_RANK",
        "RDZV_ID",
        "RUN_DIR",
        "RUNS_DIR",
    ):
        env.pop(key, None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log: Path, env: dict, cwd=REPO) -> subprocess.Popen:
    """Start a launcher in its own session (so a failed test can end everything it started) logging to `log`."""
    out = open(log, "ab")
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    """Wait for `proc`; on timeout end its whole session and fail with the log's tail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise AssertionError(f"{proc.args[:3]} did not finish in {timeout}s:\n{tail(log)}") from None


def kill_session(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(cmd, log: Path, env: dict, timeout: float = 300, cwd=REPO) -> None:
    rc = finish(start(cmd, log, env, cwd), log, timeout)
    assert rc == 0, f"{' '.join(map(str, cmd[:4]))} ... exited with {rc}:\n{tail(log)}"


def tail(path: Path, n: int = 4000) -> str:
    return Path(path).read_text(errors="replace")[-n:] if Path(path).exists() else f"({path} missing)"


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from run_dir/metrics.jsonl; a resumed run appends, and a step logged twice keeps its last value
    (validation lines carry val/... and no loss)."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                if "loss" in rec:
                    out[int(rec["step"])] = float(rec["loss"])
    return out


def last_logged_step(run_dir: Path) -> int:
    steps = losses(run_dir)
    return max(steps) if steps else 0


def checkpoints(run_dir: Path) -> list[str]:
    d = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in d.iterdir() if p.name.startswith("step_")) if d.exists() else []


def worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes a torchrun agent started (its children)."""
    found = {}
    for pid in children(agent_pid):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{tail(log) if log else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{tail(log) if log else ''}")


def assert_curves_match(got: dict[int, float], ref: dict[int, float], tol: float, steps=None) -> float:
    """Every step in `steps` (default: all reference steps) is present in both and agrees within tol; returns the
    max diff."""
    steps = sorted(ref) if steps is None else list(steps)
    missing = [s for s in steps if s not in got or s not in ref]
    assert not missing, f"steps {missing} missing (got {sorted(got)}, reference {sorted(ref)})"
    diffs = {s: abs(got[s] - ref[s]) for s in steps}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, (
        f"step {worst}: loss {got[worst]!r} vs reference {ref[worst]!r} (|diff| {diffs[worst]:.3g} > {tol})"
    )
    return diffs[worst]


# -- references, computed once per session --------------------------------------------------------------------

_scratch = Path(tempfile.mkdtemp(prefix="lemur-launch-refs-"))
atexit.register(shutil.rmtree, _scratch, True)
_refs: dict[str, dict[int, float]] = {}


def scratch(name: str) -> Path:
    p = _scratch / name
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


def single_process_reference() -> dict[int, float]:
    """The loss curve of one plain process: what every launcher's run must reproduce (within 1e-4)."""
    if "single" not in _refs:
        d = scratch("single")
        run(
            [
                PYTHON,
                "-m",
                "lemur_torch.train",
                *TRAIN_ARGS,
                f"run_dir={d}",
                "checkpoint.save_at_end=false",
                "checkpoint.export_at_end=false",
            ],
            d / "log.txt",
            train_env(),
        )
        _refs["single"] = losses(d)
        assert sorted(_refs["single"]) == list(range(1, MAX_STEPS + 1)), tail(d / "log.txt")
    return _refs["single"]


def two_process_reference() -> dict[int, float]:
    """The loss curve of an uninterrupted 2-process run (launch/torchrun.sh): what a resumed 2-process run
    must reproduce exactly."""
    if "two" not in _refs:
        d = scratch("two")
        run(
            [
                "bash",
                REPO / "launch" / "torchrun.sh",
                *TRAIN_ARGS,
                f"run_dir={d}",
                "checkpoint.save_at_end=false",
                "checkpoint.export_at_end=false",
            ],
            d / "log.txt",
            train_env(NPROC_PER_NODE="2"),
        )
        _refs["two"] = losses(d)
        assert sorted(_refs["two"]) == list(range(1, MAX_STEPS + 1)), tail(d / "log.txt")
    return _refs["two"]


def put_reference(name: str, curve: dict[int, float]) -> None:
    """Let a test that already ran the reference configuration share its curve (saves a run)."""
    _refs.setdefault(name, curve)
