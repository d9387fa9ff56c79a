"""launch/torchrun.sh: two agents as a 2-node stand-in (c10d rendezvous on 127.0.0.1, HSDP replicating across
the "nodes" and sharding within) match the single-process loss; SIGTERM to one rank's process group of a 2-rank
run with DataLoader workers (and again to every rank's group during the save) writes a complete checkpoint, ends
every process, and a restart resumes with the uninterrupted run's losses."""

import os
import signal
import time

import pytest
from conftest import children
from launch_util import (
    MAX_STEPS,
    REPO,
    TRAIN_ARGS,
    alive,
    assert_curves_match,
    checkpoints,
    finish,
    free_port,
    kill_session,
    last_logged_step,
    losses,
    single_process_reference,
    start,
    tail,
    train_env,
    two_process_reference,
    wait_for,
    worker_pids,
)

pytestmark = pytest.mark.slow  # every test here starts processes

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"


def test_two_agents_hsdp_match_single_process(tmp_path):
    run_dir = tmp_path / "run"  # one folder for both "nodes", as on a shared cluster file system
    env = train_env(
        NNODES="2",
        NPROC_PER_NODE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RDZV_ID=f"hsdp-{os.getpid()}",
    )
    args = [
        "bash",
        TORCHRUN_SH,
        *TRAIN_ARGS,
        "parallel=hsdp",
        "parallel.dp_replicate=2",
        "parallel.activation_checkpointing=none",
        "parallel.mixed_precision=fp32",
        f"run_dir={run_dir}",
        "checkpoint.save_at_end=false",
        "checkpoint.export_at_end=false",
    ]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    agents = [start(args, log, env) for log in logs]
    try:
        for agent, log in zip(agents, logs):
            rc = finish(agent, log, timeout=420)
            assert rc == 0, f"agent exited {rc}:\n{tail(log)}"
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_session(agent)
    text = "".join(tail(log, 200_000) for log in logs)
    assert "on 4 process" in text, text[-3000:]
    diff = assert_curves_match(losses(run_dir), single_process_reference(), tol=1e-4)
    print(f"2 agents x 2 processes, HSDP 2x2, vs 1 process: max |loss diff| {diff:.2e} over {MAX_STEPS} steps")


@pytest.mark.slow
def test_sigterm_to_process_groups_checkpoints_and_resumes_exactly(tmp_path):
    """torchrun starts each rank in a process group of its own and passes a signal on to the whole group, as
    Slurm signals every process of a job: the rank and its DataLoader workers (data.num_workers=2) get it."""
    run_dir = tmp_path / "run"
    args = [
        "bash",
        TORCHRUN_SH,
        *TRAIN_ARGS,
        f"run_dir={run_dir}",
        "checkpoint.export_at_end=false",
        "data.num_workers=2",
    ]
    env = train_env(NPROC_PER_NODE="2")
    log = tmp_path / "first.log"
    agent = start(args, log, env)  # torchrun.sh execs torchrun: this pid is the agent
    try:
        wait_for(lambda: last_logged_step(run_dir) >= 3, 240, "step 3", agent, log)
        workers = worker_pids(agent.pid)
        assert sorted(workers) == [0, 1], f"workers of agent {agent.pid}: {workers}"
        loaders = {rank: children(pid) for rank, pid in workers.items()}
        assert all(len(pids) == 2 for pids in loaders.values()), f"DataLoader workers per rank: {loaders}"
        assert all(os.getpgid(pid) == pid for pid in workers.values()), "each rank leads a process group of its own"
        os.killpg(workers[1], signal.SIGTERM)  # rank 1 and its workers: rank 0 must learn of the stop from rank 1
        # a second signal to every process of every rank while the checkpoint is being written must not
        # interrupt the save
        ckpt_dir = run_dir / "checkpoints"
        during_save = False
        deadline = time.monotonic() + 60
        while agent.poll() is None and time.monotonic() < deadline:
            if ckpt_dir.exists() and any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir()):
                for pid in workers.values():
                    try:
                        os.killpg(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                during_save = True
                break
            time.sleep(0.01)
        rc = finish(agent, log, timeout=120)
    finally:
        if agent.poll() is None:
            kill_session(agent)
    text = tail(log, 200_000)
    assert rc != 0, f"a preempted run must not report success:\n{text[-3000:]}"
    assert "exitcode  : 124" in text or "exitcode: 124" in text, f"trainer should exit 124:\n{text[-3000:]}"
    assert "killed by signal" not in text, text[-3000:]
    everyone = [*workers.values(), *(pid for pids in loaders.values() for pid in pids)]
    assert not any(alive(pid) for pid in everyone), "a rank or a DataLoader worker outlived the stop"
    stopped_at = last_logged_step(run_dir)
    assert 3 <= stopped_at < MAX_STEPS
    assert checkpoints(run_dir)[-1] == f"step_{stopped_at:08d}", (checkpoints(run_dir), text[-3000:])

    log2 = tmp_path / "second.log"
    rc = finish(start(args, log2, env), log2, timeout=300)
    assert rc == 0, tail(log2)
    assert "resumed from" in tail(log2, 200_000)
    # the restart picks up where the stop left off and matches the uninterrupted 2-process run (no workers: the
    # stream does not depend on them) exactly
    diff = assert_curves_match(
        losses(run_dir), two_process_reference(), tol=1e-6, steps=range(stopped_at + 1, MAX_STEPS + 1)
    )
    print(
        f"SIGTERM to rank 1's process group at step {stopped_at} (to every rank's during the save: {during_save}), "
        f"2 DataLoader workers per rank: restart matches the uninterrupted run on steps "
        f"{stopped_at + 1}-{MAX_STEPS}, max |loss diff| {diff:.2e}"
    )
