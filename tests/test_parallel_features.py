"""Activation checkpointing, per-block compile and bf16 mixed precision change memory/speed, not the maths:
each is compared against the plain fp32 run of the same model, data and seed."""

import pytest

from conftest import FAST, losses, run_train

STEPS = 4


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("plain"))
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}"])
    return losses(run_dir)


@pytest.mark.parametrize("mode", ["full", "every_n"])
def test_activation_checkpointing_same_losses(plain, tmp_path, mode):
    run_dir = str(tmp_path / mode)
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}", f"parallel.activation_checkpointing={mode}",
               "parallel.ac_every_n=2"], nproc=2)
    got = losses(run_dir)
    for step in plain:
        assert abs(plain[step] - got[step]) < 1e-4, (mode, step, plain[step], got[step])


def test_compiled_blocks_same_losses(plain, tmp_path):
    run_dir = str(tmp_path / "compiled")
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}", "parallel.compile=true"])
    got = losses(run_dir)
    for step in plain:
        assert abs(plain[step] - got[step]) < 1e-4, (step, plain[step], got[step])


def test_bf16_mixed_precision_tracks_fp32(plain, tmp_path):
    run_dir = str(tmp_path / "bf16")
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}", "parallel.mixed_precision=bf16"])
    got = losses(run_dir)
    for step in plain:
        assert abs(plain[step] - got[step]) < 0.05, (step, plain[step], got[step])
    assert any(abs(plain[s] - got[s]) > 1e-6 for s in plain), "bf16 compute should not be bit-identical to fp32"
