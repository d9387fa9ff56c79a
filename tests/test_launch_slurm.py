"""launch/slurm/cpu_test.sbatch on a real one-node Slurm (tests/slurm_cluster.py): preempted with `scancel --batch
--signal=USR1` (what `--signal=B:USR1@...` sends before the time limit) the job checkpoints, requeues itself,
resumes, and completes with a checkpoint, an HF export and the uninterrupted run's losses;
cancelled with a plain `scancel`, or stopped by its time limit (SIGTERM to every process, DataLoader workers
included), it still checkpoints, stays ended, and a job continuing the run resumes exactly; a rank that stops
responding ends the job step through the step watchdog, and the job requeues itself as after a crash and
resumes from its newest checkpoint.

The cluster needs root and Debian packages (slurm-wlm, munge); where they cannot be installed the tests skip
and say why. CI runs as root with apt-get, so they run there."""

import socket
import time
from pathlib import Path

import pytest
from launch_util import (
    MAX_STEPS,
    REPO,
    TRAIN_ARGS,
    assert_curves_match,
    checkpoints,
    free_port,
    last_logged_step,
    losses,
    tail,
    train_env,
    two_process_reference,
    wait_for,
)
from slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = pytest.mark.slow  # every test here starts processes

SBATCH = REPO / "launch" / "slurm" / "cpu_test.sbatch"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def submit(cluster, submit_dir: Path, *overrides: str, sbatch_options=(), **env_extra: str) -> tuple[int, Path]:
    """sbatch the CPU job script from `submit_dir` as a user would (`sbatch_options` before the script, overriding
    its #SBATCH lines); returns the job id and its run folder (RUN_DIR in `env_extra`: a job continuing that run)."""
    env = train_env(
        LEMUR_HOME=str(REPO), MASTER_PORT=str(free_port()), SLURM_CONF=cluster.env["SLURM_CONF"], **env_extra
    )
    try:
        socket.gethostbyname(cluster.node)  # job.sh's rendezvous host: the job's first node, by name
    except OSError:
        env["MASTER_ADDR"] = "127.0.0.1"  # a container whose own hostname does not resolve
    # the script names its experiment (EXPERIMENT, default smoke); the rest are overrides
    args = [a for a in TRAIN_ARGS if not a.startswith("experiment=")]
    out = cluster.run("sbatch", "--parsable", *sbatch_options, str(SBATCH), *args, *overrides, env=env, cwd=submit_dir)
    job = int(out.stdout.strip().split(";")[0])
    return job, Path(env_extra.get("RUN_DIR", submit_dir / "runs" / f"lemur-cpu-test-{job}"))


def job_output(submit_dir: Path, job: int, run_dir: Path) -> str:
    parts = [tail(submit_dir / f"lemur-cpu-test-{job}.out", 5000)]
    parts += (
        [f"--- {p.name}\n{tail(p, 16000)}" for p in sorted((run_dir / "logs").glob("*.log"))]
        if (run_dir / "logs").exists()
        else []
    )
    return "\n".join(parts)


def release_requeued(cluster, job: int, submit_dir: Path, run_dir: Path) -> None:
    """Wait until job.sh has requeued `job`, then let it start at once. Slurm holds a requeued job back for a few
    minutes (BeginTime); an earlier start only shortens the test. Not at once: slurmd refuses a job whose
    credential is issued in the same second its previous run's credential was revoked ("Job credential revoked")."""
    deadline = time.monotonic() + 240
    while True:
        info = cluster.job(job)
        if int(info.get("Restarts", 0)) >= 1 and info["JobState"] == "PENDING":
            time.sleep(2)
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return
        assert info["JobState"] not in FINAL, f"ended without requeue: {info}\n{job_output(submit_dir, job, run_dir)}"
        assert time.monotonic() < deadline, f"no requeue: {info}\n{job_output(submit_dir, job, run_dir)}"
        time.sleep(0.5)


def test_slurm_preempt_requeues_resumes_and_completes_with_checkpoint_and_export(cluster, tmp_path):
    """Preempted at step 3 or later, the job checkpoints, requeues itself and resumes; it then completes (Slurm's
    record says so) with the last checkpoint, the HF export, both tasks' logs, and every step's loss the plain
    2-process run's (steps up to the stop from the first attempt, the rest from the resumed one)."""
    job, run_dir = submit(cluster, tmp_path)
    wait_for(lambda: last_logged_step(run_dir) >= 3, 300, "step 3 of the Slurm job", log=run_dir / "logs" / "task0.log")
    # what `#SBATCH --signal=B:USR1@600` sends ten minutes before the time limit
    cluster.run("scancel", "--batch", "--signal=USR1", str(job))

    # job.sh requeues the job once the checkpoint is written
    release_requeued(cluster, job, tmp_path, run_dir)
    stopped_at = max(int(c.split("_")[1]) for c in checkpoints(run_dir))
    assert 3 <= stopped_at < MAX_STEPS

    info = cluster.wait_state(job, FINAL, timeout=420)
    out = job_output(tmp_path, job, run_dir)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, f"{info}\n{out}\n{cluster.logs()}"
    assert info["ExitCode"] == "0:0", f"{info}\n{out}"
    assert "preempted: requeueing" in out and "resumed from" in out, out
    # one completion record per run of the job: the requeued one, then the one that completed
    records = [line for line in (cluster.root / "jobcomp.log").read_text().splitlines() if f"JobId={job} " in line]
    assert len(records) == 2 and "JobState=COMPLETED" in records[-1], records
    assert checkpoints(run_dir)[-1] == f"step_{MAX_STEPS:08d}", out
    assert (run_dir / "hf" / "config.json").exists() and list((run_dir / "hf").glob("*.safetensors")), out
    assert (run_dir / "logs" / "task0.log").exists() and (run_dir / "logs" / "task1.log").exists()
    # the whole log: the start-of-run summary is longer than the tail shown on failure
    assert "on 2 process" in (run_dir / "logs" / "task0.log").read_text(), out
    # the Slurm job (2 srun tasks x 1 process), preempted and resumed, is the same computation as a plain
    # 2-process run from step 1 to the end
    diff = assert_curves_match(losses(run_dir), two_process_reference(), tol=1e-6)
    print(
        f"Slurm job {job}: preempted at step {stopped_at}, requeued, COMPLETED with its export; steps 1-{MAX_STEPS} "
        f"vs uninterrupted: max |loss diff| {diff:.2e} (final {losses(run_dir)[MAX_STEPS]!r})"
    )


@pytest.mark.slow
def test_slurm_sigterm_and_time_limit_checkpoint_and_resume_exactly(cluster, tmp_path):
    """SIGTERM to every process of the job, DataLoader workers included (data.num_workers=2, as the 70B runs
    have), checkpoints the step reached and ends the job without a requeue: first a plain `scancel` (as on
    Slurm preemption), then the time limit of a job continuing the run (RUN_DIR, slowed down so that the limit
    comes mid-run, and without the USR1 warning so that SIGTERM is all it gets). A third job completes the run,
    and every step's loss is the uninterrupted run's (which has no workers: the stream does not depend on them)."""
    workers = "data.num_workers=2"
    job, run_dir = submit(cluster, tmp_path, "checkpoint.export_at_end=false", workers)
    wait_for(lambda: last_logged_step(run_dir) >= 3, 300, "step 3 of the Slurm job", log=run_dir / "logs" / "task0.log")
    cluster.run("scancel", str(job))
    info = cluster.wait_state(job, FINAL, timeout=120)
    out = job_output(tmp_path, job, run_dir)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0, f"{info}\n{out}"
    assert "2 worker(s) per rank" in (run_dir / "logs" / "task0.log").read_text(), out
    cancelled_at = last_logged_step(run_dir)
    assert 3 <= cancelled_at < MAX_STEPS
    assert checkpoints(run_dir)[-1] == f"step_{cancelled_at:08d}", out

    # a minute's limit; 5 s per step: the 17 or so steps left take longer than the limit plus Slurm's 30 s check
    limit_options = ("--time=1", "--signal=B:URG@10")  # URG in place of the script's USR1 warning: ignored
    job2, _ = submit(
        cluster,
        tmp_path,
        "checkpoint.export_at_end=false",
        workers,
        sbatch_options=limit_options,
        RUN_DIR=str(run_dir),
        LEMUR_TEST_STEP_DELAY_S="5",
    )
    info = cluster.wait_state(job2, FINAL, timeout=300)
    out = job_output(tmp_path, job2, run_dir)
    assert info["JobState"] == "TIMEOUT" and int(info["Restarts"]) == 0, f"{info}\n{out}"
    timed_out_at = last_logged_step(run_dir)
    assert cancelled_at < timed_out_at < MAX_STEPS, out
    assert checkpoints(run_dir)[-1] == f"step_{timed_out_at:08d}", out
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{cancelled_at:08d}'}" in out, out

    job3, _ = submit(cluster, tmp_path, "checkpoint.export_at_end=false", workers, RUN_DIR=str(run_dir))
    info = cluster.wait_state(job3, FINAL, timeout=420)
    out = job_output(tmp_path, job3, run_dir)
    assert info["JobState"] == "COMPLETED", f"{info}\n{out}"
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{timed_out_at:08d}'}" in out, out
    diff = assert_curves_match(losses(run_dir), two_process_reference(), tol=1e-6)
    print(
        f"Slurm, data.num_workers=2: scancel at step {cancelled_at} (CANCELLED), time limit at step {timed_out_at} "
        f"(TIMEOUT), then COMPLETED; steps 1-{MAX_STEPS} vs uninterrupted: max |loss diff| {diff:.2e}"
    )


def test_slurm_hung_rank_requeues_and_resumes(cluster, tmp_path):
    """Rank 1 stops responding before step 5 (a test hook, once); the step watchdog ends both ranks, job.sh
    requeues the job as after any crash, and the requeued job resumes from step 3's checkpoint and completes
    with the uninterrupted run's losses."""
    once = tmp_path / "hung-once"
    job, run_dir = submit(
        cluster,
        tmp_path,
        "checkpoint.export_at_end=false",
        "checkpoint.every_steps=3",
        "train.hang_timeout_s=10",
        LEMUR_TEST_HANG=f"1:5:600:{once}",
    )
    release_requeued(cluster, job, tmp_path, run_dir)
    info = cluster.wait_state(job, FINAL, timeout=420)
    out = "\n".join(tail(p, 1_000_000) for p in sorted((run_dir / "logs").glob("*.log")))
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1 and once.exists(), (
        f"{info}\n{job_output(tmp_path, job, run_dir)}"
    )
    assert "step watchdog: no progress for train.hang_timeout_s=10s after step 4" in out, out
    assert "crashed (status 1): requeueing, crash requeue 1 of MAX_CRASH_REQUEUES=3" in out, out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'}" in out, out
    diff = assert_curves_match(losses(run_dir), two_process_reference(), tol=1e-6, steps=range(4, MAX_STEPS + 1))
    print(
        f"Slurm job {job}: rank 1 hung before step 5, watchdog exit, crash requeue, resumed at step 3, COMPLETED; "
        f"steps 4-{MAX_STEPS} vs uninterrupted: max |loss diff| {diff:.2e}"
    )
