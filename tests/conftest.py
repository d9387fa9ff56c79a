"""Shared helpers: run lemur-train as processes of its own (1 process, or ranks as torchrun starts them, with
gloo; forked from a server that has done the imports, tests/forkserver.py) or its gate and build_and_fit in the
test's process, and read its metrics; the session fixtures (the tokenizer, trained runs). Fakes shared by tests
and bench are in fakes.py."""

from __future__ import annotations

import atexit
import json
import multiprocessing.process
import os
import subprocess
import sys
from typing import Dict, List, Optional

import pytest
import torch
from forkserver import ForkServer, rank_envs
from omegaconf import OmegaConf

from lemur_torch.config import load_config, validate
from lemur_torch.data.schema import DataConfig
from lemur_torch.tokenizer import load_tokenizer


def _one_thread_after_fork() -> None:
    # A child forked after this process ran a multi-threaded torch op inherits OpenMP's thread pool without its
    # threads: its first parallel op waits forever (seen: two FSDP ranks forked late in the suite, both stuck in
    # all_gather_copy_in). One thread takes torch's inline path, never entering OpenMP; ranks run one thread
    # each anyway (OMP_NUM_THREADS=1 for every process a test starts).
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_after_fork)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs this lane on two xdist workers beside the XLA lane, on a 2-core machine: one torch thread
    # per worker, as in every process a test starts; two threads each would only wait on each other's cores
    torch.set_num_threads(1)

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


_ENVIRON = dict(os.environ)  # the session's environment, before any test changed it


def subprocess_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


_server: Dict[str, ForkServer] = {}


def run_python(
    args: List[str],
    nproc: int = 1,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`python *args` (args[0] is "-m" or a script) as a process of its own, or as `nproc` ranks of one node as
    torchrun --standalone starts them; stdout, stderr and the exit status (the first failed rank's) returned as
    subprocess.run returns them. Forked from this test process's fork server (its imports done once) unless the
    environment differs in a variable that an import may have read (then a plain subprocess, or torchrun)."""
    env = subprocess_env() if env is None else env
    cwd = os.getcwd() if cwd is None else str(cwd)
    _started("python " + " ".join(map(str, args))[:200])
    if "server" not in _server:
        _server["server"] = ForkServer(subprocess_env(_ENVIRON))
        atexit.register(_server["server"].close)
    server = _server["server"]
    if server.usable_for(env):
        return server.run([str(a) for a in args], rank_envs(env, nproc), cwd, timeout)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_train(
    overrides: List[str],
    nproc: int = 1,
    check: bool = True,
    timeout: int = 600,
    extra_env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess:
    """`python -m lemur_torch.train *overrides` on `nproc` ranks (run_python); `check`: fail on a non-zero exit."""
    env = subprocess_env()
    env.update(extra_env or {})
    proc = run_python(["-m", "lemur_torch.train", *overrides], nproc=nproc, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lemur_torch.train on {nproc} rank(s) exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- "
            f"stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def train_in_process(overrides: List[str], run_dir: str, sources: Optional[dict] = None) -> Dict[int, float]:
    """lemur-train's gate and build_and_fit in this process (so that a test can substitute a part, or save a
    process start): the tiny model on 64-token rows, `overrides` winning over these defaults; `sources`
    replaces the sample corpus. Returns step -> loss."""
    from lemur_torch.train import build_and_fit  # imports transformers: only the tests that train need it

    # fused AdamW: on CPU ~5x faster than the foreach default, and the same in every run compared
    base = [
        "model=tiny",
        "train.seq_len=64",
        "optim.warmup_steps=5",
        "optim.lr=1e-3",
        "optim.implementation=fused",
        "checkpoint.every_steps=0",
        "checkpoint.save_at_end=false",
        "checkpoint.export_at_end=false",
        "log.wandb_mode=disabled",
        "log.console=false",
        f"run_dir={run_dir}",
    ]
    given = {o.split("=")[0] for o in overrides}
    cfg = load_config([o for o in base if o.split("=")[0] not in given] + list(overrides))
    if sources is not None:  # replace the sample corpus (a merge would keep its sources)
        data = {**OmegaConf.to_container(cfg.data), "sources": sources}
        cfg.data = OmegaConf.merge(OmegaConf.structured(DataConfig), data)
    validate(cfg, 1)
    assert build_and_fit(cfg) == 0
    return losses(run_dir)


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


# -- the `slow` marker: every main-lane test that starts a process carries it ----------------------------------
# `make test-fast` (-m "not slow") is the edit-test loop, so a test that starts a process (a subprocess, torchrun,
# a spawned or forked worker) must be marked `@pytest.mark.slow`. Rather than trust the marker, an unmarked test
# that starts one fails and says so. Only processes that run this project's code or a launcher are counted (a
# library's own helpers, such as ldconfig behind ctypes.util.find_library, are not the test's doing).
LAUNCHERS = (
    "bash",
    "sh",
    "make",
    "torchrun",
    "accelerate",
    "sbatch",
    "srun",
    "lemur-train",
    "lemur-eval",
    "lemur-export",
)
_current: Dict[str, Optional[pytest.Item]] = {"item": None}
_STARTED = pytest.StashKey[List[str]]()


def _started(what: str) -> None:
    item = _current["item"]
    if item is not None and item.get_closest_marker("slow") is None and "tests/xla/" not in item.nodeid:
        item.stash.setdefault(_STARTED, []).append(what)


def pytest_configure(config):
    original_child = subprocess.Popen._execute_child
    original_start = multiprocessing.process.BaseProcess.start

    def execute_child(self, args, executable, *rest, **kw):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = os.path.basename(str(executable or argv[0]))
        if program.startswith("python") or os.path.realpath(str(executable or argv[0])) == sys.executable:
            _started(" ".join(map(str, argv))[:200])
        elif program in LAUNCHERS or program.endswith(".sh"):
            _started(" ".join(map(str, argv))[:200])
        return original_child(self, args, executable, *rest, **kw)

    def start(self):
        _started(f"multiprocessing {type(self).__name__} {self.name}")
        return original_start(self)

    subprocess.Popen._execute_child = execute_child
    multiprocessing.process.BaseProcess.start = start


def pytest_collection_modifyitems(config, items):
    # On xdist workers (make test: --dist loadfile --no-loadscope-reorder) whole files go to the first free
    # worker in collection order, longest first: the launcher files (Slurm, torchrun restarts, accelerate),
    # which mostly wait on schedulers, signals and timers and are the longest files, then the files that start
    # processes, then the rest; so that no long file starts last with the other worker idle.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}

        def rank(item):
            return 0 if item.path.name.startswith("test_launch_") else 1 if item.path in slow_files else 2

        items.sort(key=rank)  # stable: each file's tests stay together and in order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["item"] = item
    try:
        yield
    finally:
        _current["item"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    started = item.stash.get(_STARTED, [])
    if report.when == "call" and report.passed and started:
        report.outcome = "failed"
        report.longrepr = (
            "this test starts processes but is not marked @pytest.mark.slow (make test-fast leaves out only the "
            "slow ones):\n  " + "\n  ".join(started[:5])
        )


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


@pytest.fixture(scope="module")
def one_rank_mesh():
    """A 1-rank gloo process group and its DeviceMesh, for apply_fsdp in the test process itself (FSDP2 on one
    process: fully_shard with bf16 compute, checkpointing alone in fp32)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp_shard",))
    if owned:
        dist.destroy_process_group()
