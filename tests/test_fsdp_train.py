"""FSDP2 training on gloo: equivalence with the single-process run, resume, resharded resume."""

import os

import pytest

from conftest import FAST, losses, run_train

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


def test_keep_last_k_and_atomic_dirs(tmp_path):
    run_dir = str(tmp_path / "keep")
    run_train([*FAST, "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=2", f"run_dir={run_dir}"])
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == ["step_00000004", "step_00000006"], names
