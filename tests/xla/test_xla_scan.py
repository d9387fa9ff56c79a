"""parallel.scan_layers: the decoder layers run as one torch_xla scan (with activation checkpointing inside it).
The same number of programs is compiled for 4 and for 8 layers, and the losses are the unrolled model's."""

import os

import pytest
from xla_helpers import XLA, artifacts, eager_reference_losses, losses, run_xla

SCAN = [
    *XLA,
    "train.max_steps=3",
    "parallel.scan_layers=true",
    "parallel.activation_checkpointing=full",
    "checkpoint.every_steps=0",
    "checkpoint.save_at_end=false",
    "checkpoint.export_at_end=false",
]


@pytest.fixture(scope="module")
def runs():
    out = {}
    for layers in (4, 8):
        run_dir = os.path.join(artifacts(), f"scan{layers}")
        results = run_xla(
            os.path.join(artifacts(), f"scan{layers}.json"),
            [*SCAN, f"model.num_hidden_layers={layers}", f"run_dir={run_dir}"],
        )
        out[layers] = (run_dir, results)
    return out


def test_scan_runs_the_layers(runs):
    for layers, (_, results) in runs.items():
        assert results["layers"] == "ScannedLayers", (layers, results["layers"])


def test_compile_count_independent_of_depth(runs):
    counts = {layers: [s["compiles"] for s in results["steps"]] for layers, (_, results) in runs.items()}
    assert counts[4] == counts[8], counts
    assert counts[4][1] == counts[4][2], counts  # and nothing compiled after step 2


def test_scan_losses_equal_unrolled(runs):
    """The eager, unrolled HF model (the reference every XLA run is checked against) at both depths."""
    for layers, (run_dir, _) in runs.items():
        ref = eager_reference_losses([*SCAN, f"model.num_hidden_layers={layers}"])
        got = losses(run_dir)
        assert sorted(got) == sorted(ref) == [1, 2, 3]
        for step in ref:
            assert abs(got[step] - ref[step]) < 1e-4, (layers, step, got[step], ref[step])
