"""A real one-node Slurm cluster on localhost for the launch tests.

`SlurmCluster` installs Debian's slurm-wlm and munge when they are missing (apt-get, as root), writes a
slurm.conf for one node named after this host, starts its own munged, slurmctld and slurmd as root, all with
state, sockets, logs and ports under a private folder so nothing on the machine is touched, and waits until the
node is idle. Clients (sbatch, scontrol, scancel) find it through SLURM_CONF in `env`. `stop()` tears it down.

`unavailable_reason()` says why a cluster cannot run here (not root, no apt-get, install failed), so the tests
can skip with that reason instead of failing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"]

# What was seen working on this kind of machine (gVisor sandbox, no cgroups): linuxproc process tracking, no
# task plugin, cons_tres selection, accounting off. MinJobAge keeps finished job records for `scontrol show job`;
# the filetxt job-completion log is a second record of every final state.
SLURM_CONF = """\
ClusterName=lemurtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/slurmd
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.log
MinJobAge=86400
ReturnToService=2
KillWait=60
SlurmdTimeout=300
InactiveLimit=0
Waittime=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def unavailable_reason() -> str | None:
    """None when a cluster can be started here (installing packages if needed); otherwise why not."""
    if not _missing_binaries():
        return None if os.geteuid() == 0 else "Slurm daemons must run as root here (slurmd), and this is not root"
    if os.geteuid() != 0:
        return f"Slurm is not installed ({', '.join(_missing_binaries())} missing) and installing it needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and this machine has no apt-get to install Debian's slurm-wlm and munge"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    upd = _run(["apt-get", "update", "-q"], env=env, timeout=600)
    if upd.returncode != 0:
        return f"apt-get update failed: {upd.stderr.strip()[-300:]}"
    inst = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env, timeout=900)
    if inst.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {inst.stderr.strip()[-300:]}"
    missing = _missing_binaries()
    return f"installed {' '.join(PACKAGES)} but {missing} still missing" if missing else None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """One node, `cpus` CPUs, partition `debug`; everything lives under `root`."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> "SlurmCluster":
        for sub in ("ctld", "slurmd", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.node,
                node=self.node,
                cpus=self.cpus,
                root=self.root,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                munge_socket=self.munge_socket,
            )
        )
        # -D: stay in the foreground, so the daemons are our children and stop() can end them by pid.
        # -i: ignore state left by an earlier cluster in this folder.
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn([_sbin("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)], "slurmd.out")
        self._wait_idle(timeout)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        (self.root / "munge").chmod(0o700)
        # --force: munged refuses root and sticky-bit parents (/tmp) otherwise; this folder is private (0700).
        self._spawn(
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                f"--log-file={self.root / 'munge' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
            "munged.out",
        )
        deadline = time.monotonic() + 30
        while not self.munge_socket.exists():
            if time.monotonic() > deadline or self.procs[-1].poll() is not None:
                raise RuntimeError(f"munged did not start: {self._tail('munged.out')}{self._tail('munge/munged.log')}")
            time.sleep(0.2)

    def _spawn(self, cmd, log: str) -> None:
        out = open(self.root / log, "ab")
        self.procs.append(
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        )

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}: {self.logs()}")
            r = _run(["sinfo", "-h", "-n", self.node, "-o", "%T"], env=self.env)
            state = r.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.node} not idle after {timeout}s (state {state!r}): {self.logs()}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = _run(list(cmd), env=kw.pop("env", self.env), **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, *args: str, cwd=None) -> int:
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def wait_state(self, job_id: int, states, timeout: float) -> dict[str, str]:
        """Poll until JobState is one of `states`; return the job record."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n{self.logs()}")

    # -- diagnostics -----------------------------------------------------------------------------------------

    def _tail(self, name: str, n: int = 3000) -> str:
        p = self.root / name
        return f"\n--- {name}\n{p.read_text(errors='replace')[-n:]}" if p.exists() else ""

    def logs(self) -> str:
        return "".join(self._tail(n) for n in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"))
