"""A fork server for the Python processes the tests start: `python -m lemur_torch.train ...`, its ranks, a bench
script. Each such process spent ~4 of its ~7 CPU seconds importing torch, transformers and lemur_torch before
its first line ran (x ~150 processes in `make test`). The server imports them once, then forks one child per
process asked for; the child sets the environment, folder, argv and standard streams it was given and runs the
module or script as `python -m` / `python script.py` would (runpy, as __main__), exiting through the
interpreter's normal shutdown. The code under test is the same; what is not exercised is the interpreter's
start and the imports themselves, which tests that run a fresh interpreter on purpose still cover (the
launchers' tests: torchrun, accelerate, Slurm, restarts; tests/test_config.py's CLI error; the torch-free plan).

Ranks: `nproc` > 1 forks that many children with the variables torchrun sets for a single node (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT); as under torchrun, the first
rank to fail gets the others stopped (SIGTERM, then SIGKILL after a grace period). Their stdout and stderr
are shared, as a torchrun agent's children share its streams.

Used only where the environment asked for differs from the server's in variables read at run time (the rank
variables, LEMUR_*, WANDB_*, the current test's name): anything else (HF_HOME, PYTHONPATH, TMPDIR, ...) may have
been read while importing, so such a command runs as a plain subprocess instead.

Protocol (one server per test process, on its stdin/stdout, one JSON line each way): request {"argv", "envs"
(one per rank), "cwd", "stdout", "stderr", "grace_s"}; replies {"pids": [...]} once forked, then {"codes":
[...], "first_failure"} (exit statuses as subprocess gives them: negative for a signal).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

# what every forked process would import first; lemur_torch.train and .export are also run as __main__, so
# they are dropped from sys.modules before a child runs them (as `python -m` would find them: not imported)
PRELOAD = (
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.convert_slow_tokenizer",
    "hydra",
    "lemur_torch.train",
    "lemur_torch.export",
)
# variables that nothing reads while importing: a request may change them and still be forked
RUNTIME_VARS = frozenset(
    (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PYTEST_CURRENT_TEST",
    )
)
RUNTIME_PREFIXES = ("LEMUR_", "WANDB_")


# -- the server -------------------------------------------------------------------------------------------------


# the request and reply pipes, moved off stdin/stdout (0 and 1) so that nothing an import prints reaches them
_CHANNEL = {"in": 0, "out": 1}


def _reply(msg: dict) -> None:
    os.write(_CHANNEL["out"], (json.dumps(msg) + "\n").encode())


def _wait(pids: List[int], grace_s: float) -> Dict[str, object]:
    """Every child's exit status (in `pids`' order) and the first non-zero one to arrive (the failure that got
    the others stopped, not the SIGTERM that stopped them)."""
    codes: Dict[int, int] = {}
    first: Optional[int] = None
    stop_at: Optional[float] = None
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
                if codes[pid] != 0 and stop_at is None:  # as torchrun's agent: one rank failed, stop the rest
                    first = codes[pid]
                    stop_at = time.monotonic() + grace_s
                    for other in pids:
                        if other not in codes:
                            _signal(other, signal.SIGTERM)
        if stop_at is not None and time.monotonic() > stop_at:
            for other in pids:
                if other not in codes:
                    _signal(other, signal.SIGKILL)
        time.sleep(0.02)
    return {"codes": [codes[pid] for pid in pids], "first_failure": first}


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def serve() -> tuple:
    """Import PRELOAD, then fork on each request. Returns only in a child: (request, its environment)."""
    _CHANNEL["in"], _CHANNEL["out"] = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    for name in PRELOAD:
        importlib.import_module(name)
    import transformers

    transformers.LlamaForCausalLM  # noqa: B018  (transformers' lazy module: load the class now)
    sys.stdout.flush()
    sys.stderr.flush()
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(_CHANNEL["in"], 1 << 16)
            if not chunk:  # the test process is gone
                os._exit(0)
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        job = json.loads(line)
        pids = []
        for env in job["envs"]:
            pid = os.fork()
            if pid == 0:
                return job, env
            pids.append(pid)
        _reply({"pids": pids})
        _reply(_wait(pids, job["grace_s"]))


def run_child(job: dict, env: Dict[str, str]) -> None:
    """In the forked child: become the process asked for, then run it as __main__."""
    os.close(_CHANNEL["in"])
    os.close(_CHANNEL["out"])
    os.environ.clear()
    os.environ.update(env)
    os.chdir(job["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(job["stdout"], os.O_WRONLY | os.O_APPEND)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_APPEND)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    random.seed()  # a fresh interpreter's state, not the server's
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    argv = job["argv"]
    if argv[0] == "-m":
        module = argv[1]
        sys.argv = [module, *argv[2:]]
        sys.path[0] = os.getcwd()  # as `python -m`: the current folder first
        sys.modules.pop(module, None)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python script.py`: the script's folder
        runpy.run_path(argv[0], run_name="__main__")


# -- the client (in the test process) ---------------------------------------------------------------------------


class ForkServer:
    def __init__(self, env: Dict[str, str]):
        self.env = dict(env)
        self.log = tempfile.TemporaryFile()  # the server's own stderr: what its imports print, or why it died
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=self.env,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        self.buf = b""

    def usable_for(self, env: Dict[str, str]) -> bool:
        keys = set(env) | set(self.env)
        changed = {k for k in keys if env.get(k) != self.env.get(k)}
        return self.proc.poll() is None and all(k in RUNTIME_VARS or k.startswith(RUNTIME_PREFIXES) for k in changed)

    def _read(self, deadline: Optional[float]) -> Optional[dict]:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.log.seek(0)
                    raise RuntimeError(
                        f"the test fork server exited ({self.proc.wait()}):\n{self.log.read().decode()[-4000:]}"
                    )
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def run(
        self, argv: Sequence[str], envs: List[Dict[str, str]], cwd: str, timeout: float, grace_s: float = 15.0
    ) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="lemur-fork-") as tmp:
            paths = {name: os.path.join(tmp, name) for name in ("stdout", "stderr")}
            for path in paths.values():
                open(path, "w").close()
            job = {"argv": list(argv), "envs": envs, "cwd": cwd, "grace_s": grace_s, **paths}
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            pids = self._read(None)["pids"]
            reply = self._read(time.monotonic() + timeout)
            timed_out = reply is None
            if timed_out:  # as subprocess.run: kill, collect, raise
                for pid in pids:
                    _signal(pid, signal.SIGKILL)
                reply = self._read(None)
            out, err = (open(paths[k], errors="replace").read() for k in ("stdout", "stderr"))
        cmd = [sys.executable, *argv]
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
        return subprocess.CompletedProcess(cmd, reply["first_failure"] or 0, out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def rank_envs(env: Dict[str, str], nproc: int) -> List[Dict[str, str]]:
    """The variables torchrun --standalone gives each rank of one node."""
    if nproc == 1:
        return [dict(env)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = dict(
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    return [{**env, **common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(nproc)]


if __name__ == "__main__":
    run_child(*serve())
