"""FSDP2 training on gloo: equivalence with the single-process run, resume, resharded resume."""

import os

import pytest
from conftest import FAST, losses, read_metrics, run_train

pytestmark = pytest.mark.slow  # every test here starts processes

STEPS = 20


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("single"))
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}"])
    return run_dir


def test_two_ranks_match_single_process(single_run, tmp_path):
    run_dir = str(tmp_path / "ddp2")
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}"], nproc=2)
    ref, got = losses(single_run), losses(run_dir)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(ref[step] - got[step]) < 1e-4, (step, ref[step], got[step])
    assert ref[STEPS] < ref[1] - 0.5, "the model should learn"


def test_resume_matches_uninterrupted(single_run, tmp_path):
    run_dir = str(tmp_path / "resumed")
    base = [*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}"]
    run_train([*base, "train.stop_at_step=10"])
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000010"))
    assert max(losses(run_dir)) == 10
    run_train(base)  # checkpoint.resume=auto picks step 10
    ref, got = losses(single_run), losses(run_dir)
    for step in range(11, STEPS + 1):
        assert abs(ref[step] - got[step]) < 1e-6, (step, ref[step], got[step])


def test_two_rank_checkpoint_resumes_on_one_rank(single_run, tmp_path):
    run_dir = str(tmp_path / "resharded")
    base = [*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}"]
    run_train([*base, "train.stop_at_step=10"], nproc=2)
    run_train(base, nproc=1)
    ref, got = losses(single_run), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert abs(ref[step] - got[step]) < 1e-4, (step, ref[step], got[step])


def test_keep_last_k_atomic_dirs_and_wandb_files(tmp_path):
    run_dir = str(tmp_path / "keep")
    run_train(
        [
            *FAST,
            "train.max_steps=6",
            "checkpoint.every_steps=2",
            "checkpoint.keep_last=2",
            f"run_dir={run_dir}",
            "log.wandb_mode=offline",
        ]
    )
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == ["step_00000004", "step_00000006"], names
    runs = [d for d in os.listdir(os.path.join(run_dir, "wandb")) if d.startswith("offline-run-")]
    assert runs and any(f.endswith(".wandb") for f in os.listdir(os.path.join(run_dir, "wandb", runs[0])))
    metrics = read_metrics(run_dir)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "loss/code", "loss/text", "step_time_s"):
        assert key in metrics[-1], key


def test_nonfinite_steps_are_skipped_then_abort(tmp_path):
    run_dir = str(tmp_path / "nan")
    # an absurd lr blows the weights up after the first update; later steps are non-finite
    proc = run_train(
        [
            *FAST,
            "train.max_steps=10",
            "optim.lr=1e30",
            "optim.warmup_steps=3",
            "train.grad_clip=1e30",
            "train.max_nonfinite_steps=3",
            f"run_dir={run_dir}",
        ],
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "3 consecutive steps with a non-finite loss or grad norm" in proc.stderr
    metrics = read_metrics(run_dir)
    # the step that ends the run is logged too (its metrics are read during the next step, which is discarded)
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 2, 3], metrics
    assert "last: step 4: loss=" in proc.stderr, proc.stderr[-2000:]
    # a skipped step does not advance the schedule: steps 3 and 4 run at step 2's lr (the warmup would raise it)
    assert metrics[3]["lr"] == metrics[2]["lr"] == metrics[1]["lr"] > metrics[0]["lr"], [m["lr"] for m in metrics]
