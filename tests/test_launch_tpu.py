"""The TPU VM pod scripts (launch/tpu/), without GCP: each script's dry run (the command every worker would
run), the worker-side launcher run for real on this machine (training detached from the shell that started
it, its log, pid and exit status), and the queued-resource supervisor driven by a fake `gcloud` through a
spot preemption and a crash to the end of training."""

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))

pytestmark = pytest.mark.slow  # every test here starts processes (the scripts, bash -n)


def _dry_run(script: str, *args: str, workers: int = 3) -> list:
    env = {**os.environ, "LEMUR_TPU_DRY_RUN": "1", "WORKERS": str(workers)}
    out = subprocess.run([str(TPU / script), *args], env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()


def _per_worker(lines: list, workers: int) -> dict:
    found = {}
    for line in lines:
        if line.startswith("[worker "):
            w, cmd = line[len("[worker ") :].split("] ", 1)
            found[int(w)] = cmd
    assert sorted(found) == list(range(workers)), lines
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_setup_installs_cpu_torch_then_the_tpu_extra_on_every_worker():
    lines = _dry_run("setup.sh", "my-tpu", "us-central2-b")
    assert any(line.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in line for line in lines)
    for w, cmd in _per_worker(lines, 3).items():
        steps = [s.strip() for s in cmd.split(";")]
        torch = [s for s in steps if "pip install" in s and "torch==" in s]
        # torch pinned to the CPU wheel (PyPI's torch is the CUDA build) before anything can pull another one
        assert torch == [
            "~/lemur-torch/.venv/bin/python -m pip install -q torch==2.9.0 --index-url "
            "https://download.pytorch.org/whl/cpu"
        ], steps
        package = [i for i, s in enumerate(steps) if 'install -q -e "$HOME/lemur-torch[tpu]"' in s]
        assert package and steps.index(torch[0]) < package[0], steps
        # the check that the venv holds the CPU torch, and lemur-train where train.sh looks for it
        assert any("torch.version.cuda is None" in s and "2.9.0+cpu" in s for s in steps)
        assert steps[-1] == "test -x ~/lemur-torch/.venv/bin/lemur-train"
        assert f"worker {w}:" in cmd


def test_setup_mounts_the_bucket_with_gcsfuse():
    env_lines = subprocess.run(
        [str(TPU / "setup.sh"), "t", "z"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "LEMUR_TPU_DRY_RUN": "1", "WORKERS": "1", "GCS_BUCKET": "bkt"},
    ).stdout
    assert "gcsfuse --implicit-dirs bkt /mnt/lemur" in env_lines


def test_train_starts_detached_on_every_worker_with_its_own_log():
    lines = _dry_run(
        "train.sh", "my-tpu", "us-central2-b", "experiment=lemur_70b_pretrain", "run_dir=/mnt/lemur/runs/a b"
    )
    for w, cmd in _per_worker(lines, 3).items():
        assert cmd == (
            f"cd ~/lemur-torch && LEMUR_WORKER={w} launch/tpu/worker_train.sh parallel=xla_spmd "
            "experiment=lemur_70b_pretrain run_dir=/mnt/lemur/runs/a\\ b"
        )
        assert shlex.split(cmd)[-1] == "run_dir=/mnt/lemur/runs/a b"  # arguments survive the remote shell


def test_stop_and_logs_commands():
    for _w, cmd in _per_worker(_dry_run("stop.sh", "t", "z"), 3).items():
        assert "kill -TERM" in cmd and "~/lemur-torch-logs/train.pid" in cmd
    [line] = _dry_run("logs.sh", "t", "z", "2")
    assert line.startswith("[worker 2] tail -n 50 ~/lemur-torch-logs/train.worker2.log;")


def _fake_trainer(tmp_path: Path) -> Path:
    prog = tmp_path / "fake-lemur-train"
    prog.write_text(
        "#!/usr/bin/env bash\n"
        'echo "args: $*"; echo "sid: $(ps -o sid= -p $$ | tr -d \' \')"\n'
        "trap 'echo \"stop signal\"; exit 124' TERM\n"
        "while true; do sleep 0.1; done\n"
    )
    prog.chmod(0o755)
    return prog


def _wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_worker_launcher_detaches_logs_and_records_the_exit_status(tmp_path):
    """worker_train.sh as a worker runs it: it returns at once; training lives in its own session and survives
    the end of the shell (and its process group) that started it; stop.sh's command ends it with a
    checkpoint-style exit status, which the launcher records."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "LEMUR_TRAIN": str(_fake_trainer(tmp_path)), "LEMUR_WORKER": "3"}
    logs = home / "lemur-torch-logs"
    t0 = time.time()
    # like an ssh session: its own process group, hung up when it ends
    shell = subprocess.Popen(
        [str(TPU / "worker_train.sh"), "parallel=xla_spmd", "run_dir=/x y"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = shell.communicate(timeout=30)[0]
    assert shell.returncode == 0 and time.time() - t0 < 20, out
    assert "worker 3: lemur-train started" in out
    log = logs / "train.worker3.log"
    assert _wait_for(lambda: log.exists() and "sid:" in log.read_text())
    pid = int((logs / "train.pid").read_text())
    try:
        os.killpg(shell.pid, signal.SIGHUP)  # the session that started it is gone
    except ProcessLookupError:
        pass
    time.sleep(0.5)
    os.kill(pid, 0)  # still running
    text = log.read_text()
    assert "args: parallel=xla_spmd run_dir=/x y" in text and text.startswith("=== ")
    assert int(text.split("sid:")[1].split()[0]) != os.getsid(0)  # not in the caller's session
    # a second start on the same worker is refused while it runs
    again = subprocess.run([str(TPU / "worker_train.sh"), "parallel=xla_spmd"], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "already running" in again.stderr
    # the status and stop commands the scripts send to a worker
    [status_line] = _dry_run("logs.sh", "t", "z", "3", "0")
    status_cmd = status_line.split("] ", 1)[1]
    status = lambda: subprocess.run(["bash", "-c", status_cmd], env=env, capture_output=True, text=True).stdout.split()  # noqa: E731
    assert status()[-1] == "running"
    stop_cmd = _per_worker(_dry_run("stop.sh", "t", "z", workers=1), 1)[0]
    assert "SIGTERM sent" in subprocess.run(["bash", "-c", stop_cmd], env=env, capture_output=True, text=True).stdout
    assert _wait_for(lambda: (logs / "train.exit").exists())
    assert (logs / "train.exit").read_text().strip() == "124"
    assert status()[-2:] == ["exit", "124"]
    assert "stop signal" in log.read_text()


FAKE_GCLOUD = r"""#!/usr/bin/env bash
S=$FAKE_STATE
echo "$*" >> "$S/calls"
case "$*" in
  *"queued-resources describe"*) [ -f "$S/state" ] && cat "$S/state" || exit 1 ;;
  *"queued-resources create"*) echo ACTIVE > "$S/state" ;;
  *"queued-resources delete"*) rm -f "$S/state" ;;
  *"tpu-vm ssh"*)
    cmd="${@: -1}"
    if [[ "$cmd" == *"kill -0"* ]]; then  # a status query: the next scripted answer
      ev=$(head -n 1 "$S/events"); sed -i 1d "$S/events"
      if [ "$ev" = preempt ]; then echo SUSPENDED > "$S/state"; echo running; else echo "$ev"; fi
    fi ;;
esac
exit 0
"""


def test_queued_resource_supervisor_restarts_after_preemption_and_crash(tmp_path):
    """queued.sh against a fake gcloud: the spot slice is preempted while training (the queued resource
    leaves ACTIVE) -> deleted, recreated, set up and trained again; then lemur-train exits non-zero on
    worker 0 -> stopped on every worker and started again; then it exits 0 -> the resource is deleted."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    (state / "events").write_text("preempt\nexit 1\nexit 1\nnone\nexit 0\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_STATE": str(state),
        "WORKERS": "2",
        "POLL_S": "0",
        "MAX_RESTARTS": "5",
    }
    r = subprocess.run(
        [str(TPU / "queued.sh"), "lemur", "us-central2-b", "v4-16", "tpu-ubuntu2204-base", "run_dir=/mnt/lemur/runs/x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (state / "calls").read_text().splitlines()
    creates = [c for c in calls if "queued-resources create" in c]
    assert len(creates) == 2 and all("--spot" in c and "--accelerator-type v4-16" in c for c in creates)
    assert len([c for c in calls if "queued-resources delete" in c]) == 2  # after the preemption, at the end
    starts = [c for c in calls if "worker_train.sh" in c]
    assert len(starts) == 3 * 2  # first slice, recreated slice, after the crash; 2 workers each
    assert all("parallel=xla_spmd run_dir=/mnt/lemur/runs/x" in c for c in starts)
    assert len([c for c in calls if "kill -TERM" in c]) == 2  # stop.sh on both workers before the restart
    assert (
        "restart 1: queued resource went SUSPENDED" in r.stdout
        and "restart 2: lemur-train on worker 0: exit 1" in r.stdout
    )
    assert "training finished" in r.stdout


def test_queued_resource_supervisor_gives_up_after_max_restarts(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    (state / "events").write_text("exit 1\nnone\nnone\n" * 3)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_STATE": str(state),
        "WORKERS": "2",
        "POLL_S": "0",
        "MAX_RESTARTS": "2",
    }
    r = subprocess.run(
        [str(TPU / "queued.sh"), "lemur", "z", "v4-16", "rt"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and "more than MAX_RESTARTS=2 restarts" in r.stdout, r.stdout + r.stderr
