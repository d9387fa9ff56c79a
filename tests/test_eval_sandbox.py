"""The HumanEval executor: every canonical solution passes, a wrong version of each fails, and hostile programs
(infinite loop, memory bomb, fork bomb, writes outside the folder, reading the parent's environment, network)
are contained, reported as failures, and the run goes on. pass@k against the closed form."""

import json
import math
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from lemur_torch.eval.humaneval import check_program, load_problems, pass_at_k
from lemur_torch.eval.sandbox import Sandbox, SandboxLimits

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# the canonical solution, then the entry point rebound to return a near miss of the right type: the checks
# must compare values, not only run without an error
WRONG = """
_right_{e} = {e}
def {e}(*args, **kwargs):
    value = _right_{e}(*args, **kwargs)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    return [value]
"""


@pytest.mark.slow
def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    programs = []
    for p in problems:  # interleaved, so that a result landing on the wrong index would show
        programs.append(check_program(p, p["canonical_solution"]))
        programs.append(check_program(p, p["canonical_solution"] + WRONG.format(e=p["entry_point"])))
    results = Sandbox(SandboxLimits(timeout_s=30)).run_all(programs)
    canonical, wrong = results[0::2], results[1::2]
    assert [p["task_id"] for p, r in zip(problems, canonical) if not r.passed] == []
    assert [p["task_id"] for p, r in zip(problems, wrong) if r.passed] == []
    assert all(r.result == "passed" for r in canonical)
    assert all(r.result.startswith("failed: AssertionError") for r in wrong), {r.result for r in wrong}


def hostile_programs(secret: str, outside: str, port: int):
    return {
        "infinite loop": "while True:\n    pass\n",
        # passes only if it got 2 GiB (the limit below is 512 MiB)
        "memory bomb": "blocks = []\nfor _ in range(32):\n    blocks.append(bytearray(64 * 1024 * 1024))\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        # passes if any write outside its own folder succeeded
        "write outside": (
            "import os\nwrote = []\n"
            f"for path in [{outside!r}, '/tmp/lemur-escape-{secret}', os.path.join(os.path.dirname(os.getcwd()), "
            f"'lemur-escape-{secret}')]:\n"
            "    try:\n        with open(path, 'w') as f:\n            f.write('escaped')\n        wrote.append(path)\n"
            "    except OSError:\n        pass\nassert wrote\n"
        ),
        # passes if the secret of the evaluating process is readable anywhere
        "parent environment": (
            "import os\n"
            f"found = any({secret!r} in v for v in os.environ.values())\n"
            "for pid in os.listdir('/proc'):\n"
            "    try:\n"
            f"        found = found or {secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
            "    except OSError:\n        pass\n"
            "assert found\n"
        ),
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
    }


def sandbox_processes(sandbox: Sandbox):
    """Processes running under the sandbox's own uids (root runs only)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if sandbox._uid_base <= uid < sandbox._uid_base + 64:
            found.append(pid)
    return found


@pytest.mark.slow
def test_hostile_programs_are_contained_and_the_run_goes_on(tmp_path, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("LEMUR_EVAL_SECRET", secret)
    outside = str(tmp_path / "escaped.txt")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    sandbox = Sandbox(SandboxLimits(timeout_s=3, cpu_s=1, memory_mb=512, processes=8), workers=2)
    prot = sandbox.protections()
    # the fork bomb is only safe to run where the process limit binds: a uid of its own (root) or a user namespace
    assert prot["uid"] != 0 and (prot["uid"] != os.getuid() or prot["user_namespace"]), prot
    hostile = hostile_programs(secret, outside, server.getsockname()[1])
    # afterwards, an ordinary program; it also checks its surroundings: an empty folder of its own, nothing inherited
    ordinary = (
        "import os\nassert os.listdir('.') == [] and os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR']\n"
        "assert set(os.environ) <= {'HOME', 'TMPDIR', 'PATH', 'LANG', 'LC_CTYPE', 'PYTHONHASHSEED', "
        "'PYTHONDONTWRITEBYTECODE'}, sorted(os.environ)\nassert sum(range(10)) == 45\n"
    )
    programs = list(hostile.values()) + [ordinary]
    t0 = time.perf_counter()
    results = sandbox.run_all(programs)
    elapsed = time.perf_counter() - t0
    server.close()
    got = dict(zip(list(hostile) + ["afterwards"], results))
    for name in hostile:
        assert not got[name].passed, (name, got[name])
    assert got["afterwards"].passed, got["afterwards"]
    assert got["infinite loop"].result == "timed out"
    assert got["fork bomb"].result == "timed out"
    assert "MemoryError" in got["memory bomb"].result
    assert got["write outside"].result.startswith("failed: AssertionError")  # every write raised
    assert got["parent environment"].result.startswith("failed: AssertionError")
    assert "unreachable" in got["network"].result or "refused" in got["network"].result, got["network"].result
    assert not os.path.exists(outside) and not os.path.exists(f"/tmp/lemur-escape-{secret}")
    assert elapsed < 60, elapsed  # 7 programs on 2 workers, each bounded by the 3 s wall clock
    if os.geteuid() == 0:
        time.sleep(0.5)
        assert sandbox_processes(sandbox) == []  # the fork bomb's PID namespace died with it
    assert prot["network_namespace"] and prot["pid_namespace"] and prot["readonly_filesystem"] and prot["private_proc"]


NOBODY_SCRIPT = """
import json, os, sys
sys.path.insert(0, {src!r})
from lemur_torch.eval.sandbox import Sandbox, SandboxLimits
os.environ["LEMUR_EVAL_SECRET"] = {secret!r}
sandbox = Sandbox(SandboxLimits(timeout_s=3, cpu_s=1, memory_mb=512, processes=8), workers=2, python=sys.executable)
results = sandbox.run_all(json.loads({programs!r}) + ["assert True"])
print(json.dumps({{"protections": sandbox.protections(), "results": [r.result for r in results]}}))
"""


def unprivileged_python():
    """An interpreter whose standard library an unprivileged uid can read (a pyenv Python under /root is not)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [python, "-I", "-c", "import ctypes, json, resource"],
                user=65534,
                group=65534,
                extra_groups=[],
                capture_output=True,
                cwd="/",
            )
        except OSError:  # not even executable by that uid
            continue
        if probe.returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="run as non-root, the test above already runs the unprivileged path")
@pytest.mark.slow
def test_unprivileged_user_gets_the_same_containment():
    """As root the sandbox drops to a uid of its own; a user without privileges goes through a user namespace
    instead. Run the hostile programs from an evaluator running as nobody."""
    python = unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter readable by an unprivileged uid on this machine")
    secret = secrets.token_hex(8)
    programs = list(hostile_programs(secret, f"/tmp/lemur-escape-nobody-{secret}", 9).values())
    script = NOBODY_SCRIPT.format(src=SRC, secret=secret, programs=json.dumps(programs))
    proc = subprocess.run(
        [python, "-I", "-c", script],
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/tmp",
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    prot, results = out["protections"], out["results"]
    assert (
        prot["user_namespace"] and prot["pid_namespace"] and prot["network_namespace"] and prot["readonly_filesystem"]
    ), prot
    assert results[-1] == "passed" and all(r != "passed" for r in results[:-1]), results
    assert results[0] == "timed out" and results[2] == "timed out", results
    assert not os.path.exists(f"/tmp/lemur-escape-nobody-{secret}")
    time.sleep(0.5)
    leftover = subprocess.run(["ps", "-u", "65534", "-o", "pid="], capture_output=True, text=True).stdout.split()
    assert leftover == [], leftover


def test_pass_at_k_is_the_unbiased_estimator():
    n, c = [10, 10, 5, 3], [0, 3, 5, 1]

    def closed_form(n, c, k):
        return 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)

    got = pass_at_k(n, c, [1, 3])
    for k in (1, 3):
        assert abs(got[f"pass@{k}"] - sum(closed_form(a, b, k) for a, b in zip(n, c)) / len(n)) < 1e-12
    assert "pass@10" not in pass_at_k(n, c, [10])  # undefined where some problem has fewer than k samples


@pytest.mark.slow
def test_a_launcher_that_hangs_is_killed_and_reported(tmp_path, monkeypatch):
    """The evaluator's backstop: a launcher that never starts the program (here a fake interpreter that only
    sleeps) is killed with its process group, and the evaluation stops with a message instead of a score."""
    from lemur_torch.eval import sandbox as sandbox_module

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox_module, "_BACKSTOP_S", 0.5)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="could not start a program: the set-up ran past sandbox.timeout_s"):
        Sandbox(SandboxLimits(timeout_s=1), workers=1, python=str(fake)).run("pass")
    assert time.perf_counter() - t0 < 30
    sleepers = subprocess.run(["pgrep", "-f", "sleep 300"], capture_output=True, text=True).stdout.split()
    assert sleepers == []
