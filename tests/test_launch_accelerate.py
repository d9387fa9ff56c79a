"""`accelerate launch` with launch/accelerate/cpu_2proc.yaml starts lemur-train as 2 gloo processes that run to
completion and reproduce the plain single-process loss curve (accelerate only launches; FSDP2 is lemur-train's)."""

import shutil
from pathlib import Path

import pytest
from launch_util import (
    MAX_STEPS,
    REPO,
    TRAIN_ARGS,
    assert_curves_match,
    checkpoints,
    losses,
    put_reference,
    run,
    single_process_reference,
    tail,
    train_env,
)

pytestmark = pytest.mark.slow  # every test here starts processes

ACCELERATE = Path(__import__("sys").executable).with_name("accelerate")


@pytest.mark.skipif(
    not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="accelerate is not installed"
)
def test_accelerate_launch_two_cpu_processes(tmp_path):
    exe = str(ACCELERATE) if ACCELERATE.exists() else shutil.which("accelerate")
    run_dir = tmp_path / "run"
    log = tmp_path / "log.txt"
    run(
        [
            exe,
            "launch",
            "--config_file",
            REPO / "launch/accelerate/cpu_2proc.yaml",
            "-m",
            "lemur_torch.train",
            *TRAIN_ARGS,
            f"run_dir={run_dir}",
            "checkpoint.export_at_end=false",
        ],
        log,
        train_env(),
        timeout=300,
    )

    text = tail(log, 200_000)
    assert "on 2 process" in text, f"expected a 2-process run:\n{text[-3000:]}"
    # one DCP shard file per rank: both processes took part in the final checkpoint
    (ckpt,) = checkpoints(run_dir)
    assert ckpt == f"step_{MAX_STEPS:08d}"
    assert len(list((run_dir / "checkpoints" / ckpt).glob("*.distcp"))) == 2

    curve = losses(run_dir)
    diff = assert_curves_match(curve, single_process_reference(), tol=1e-4)
    print(f"accelerate 2 processes vs 1 process: max |loss diff| {diff:.2e} over {MAX_STEPS} steps")
    put_reference("two", curve)
