"""Activation checkpointing, per-block compile and bf16 mixed precision change memory/speed, not the maths:
each is compared against the plain fp32 run of the same model, data and seed (bf16 runs against the plain
bf16 run); HSDP's gradient accumulation is checked by counting its collectives."""

import json
import os

import pytest
from conftest import FAST, losses, run_python, run_train

pytestmark = pytest.mark.slow  # every test here starts processes

STEPS = 4
# Compiled bf16 against eager bf16: inductor fuses elementwise chains (RMSNorm, RoPE, SiLU*up, the residual
# adds) and keeps their intermediates in fp32 where eager rounds each op's output to bf16 (8-bit mantissa,
# relative rounding up to 2^-9 = 2e-3 per op). Those per-element differences average out over the step's
# 256 label tokens: measured here up to 1.3e-4 on a loss of ~10.4 over 4 steps. 1e-3 leaves ~8x margin and
# is still ~10x below what a real fault (a lost gradient, wrong recomputation) moves the loss in a step.
BF16_COMPILED_TOL = 1e-3


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("plain"))
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}"])
    return losses(run_dir)


@pytest.mark.parametrize("mode", ["full", "every_n", "selective"])
def test_activation_checkpointing_same_losses(plain, tmp_path, mode):
    run_dir = str(tmp_path / mode)
    run_train(
        [
            *FAST,
            f"train.max_steps={STEPS}",
            f"run_dir={run_dir}",
            f"parallel.activation_checkpointing={mode}",
            "parallel.ac_every_n=2",
        ],
        nproc=2,
    )
    got = losses(run_dir)
    for step in plain:
        assert abs(plain[step] - got[step]) < 1e-4, (mode, step, plain[step], got[step])


@pytest.fixture(scope="module")
def plain_bf16(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("bf16"))
    run_train([*FAST, f"train.max_steps={STEPS}", f"run_dir={run_dir}", "parallel.mixed_precision=bf16"])
    return losses(run_dir)


def test_bf16_mixed_precision_tracks_fp32(plain, plain_bf16):
    for step in plain:
        assert abs(plain[step] - plain_bf16[step]) < 0.05, (step, plain[step], plain_bf16[step])
    assert any(abs(plain[s] - plain_bf16[s]) > 1e-6 for s in plain), "bf16 compute should not be bit-identical to fp32"


@pytest.mark.parametrize("precision, ac", [("fp32", "full"), ("bf16", "full"), ("fp32", "selective")])
def test_compiled_sharded_checkpointed_blocks_match_eager_single_process(plain, plain_bf16, tmp_path, precision, ac):
    """parallel.compile=true under FSDP2 on 2 ranks with activation checkpointing (whole layers, and torchtitan's
    op-level policy traced by compile), against the eager 1-process run: the same losses within 1e-4 in fp32,
    within BF16_COMPILED_TOL in bf16."""
    run_dir = str(tmp_path / f"{precision}_{ac}")
    run_train(
        [
            *FAST,
            f"train.max_steps={STEPS}",
            f"run_dir={run_dir}",
            "parallel.compile=true",
            f"parallel.activation_checkpointing={ac}",
            f"parallel.mixed_precision={precision}",
        ],
        nproc=2,
    )
    got = losses(run_dir)
    ref, tol = (plain, 1e-4) if precision == "fp32" else (plain_bf16, BF16_COMPILED_TOL)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(ref[step] - got[step]) < tol, (precision, step, ref[step], got[step])
    if precision == "bf16":
        assert any(abs(plain[s] - got[s]) > 1e-6 for s in plain), "the compiled run should really compute in bf16"


def test_bf16_reduce_and_last_layer_kept_on_two_ranks(plain_bf16, tmp_path):
    """parallel.reduce_dtype=bf16 with parallel.reshard_last_layer=false (the 70B configs' settings) on 2 ranks:
    the losses track the 1-process bf16 run as closely as the same 2 ranks reducing in fp32 do, and differ from
    that run's (the reduce-scatter really rounds the sum to bf16; keeping a layer gathered changes no value)."""
    runs = {}
    for reduce in ("fp32", "bf16"):
        run_dir = str(tmp_path / reduce)
        run_train(
            [
                *FAST,
                f"train.max_steps={STEPS}",
                f"run_dir={run_dir}",
                "parallel.mixed_precision=bf16",
                f"parallel.reduce_dtype={reduce}",
                f"parallel.reshard_last_layer={str(reduce == 'fp32').lower()}",
            ],
            nproc=2,
        )
        runs[reduce] = losses(run_dir)
    for step in plain_bf16:
        for reduce, got in runs.items():
            assert abs(plain_bf16[step] - got[step]) < BF16_COMPILED_TOL, (reduce, step, plain_bf16[step], got[step])
    assert any(abs(runs["fp32"][s] - runs["bf16"][s]) > 1e-7 for s in plain_bf16), runs


def test_hsdp_all_reduces_across_replicas_once_per_step(tmp_path):
    """HSDP 2 x 2 on 4 gloo processes, 2 micro-batches: reduce-scatter within the shard group after each
    micro-batch, all-reduce across replicas only after the last; the accumulated gradients equal a plain
    single-process model's over all 8 micro-batches."""
    out = tmp_path / "hsdp.json"
    script = os.path.join(os.path.dirname(__file__), "scripts", "hsdp_collectives.py")
    proc = run_python([script, "--out", str(out)], nproc=4)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    first, last = result["counts"]
    assert first.get("all_reduce/dp_replicate", 0) == 0, first
    assert first.get("reduce_scatter_single/dp_shard", 0) > 0, first  # each rank keeps only its gradient shard
    assert last.get("all_reduce/dp_replicate", 0) == last.get("reduce_scatter_single/dp_shard", 0) > 0, last
    assert result["max_rel_grad_err"] < 1e-5, result
