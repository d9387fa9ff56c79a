"""parallel=xla_spmd on 4 CPU PJRT devices: the losses of the eager reference, and one compiled graph per step."""

import pytest

from xla_helpers import STEPS, XLA, eager_reference_losses, full_results, full_run, losses


@pytest.fixture(scope="module")
def run_dir():
    return full_run()


def test_losses_match_eager_reference(run_dir):
    got = losses(run_dir)
    ref = eager_reference_losses(XLA)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])
    assert got[STEPS] < got[1] - 0.3, "the model should learn"


def test_compile_count_stops_growing_after_two_steps(run_dir):
    steps = full_results()["steps"]
    assert len(steps) == STEPS
    # step 1 compiles the step without optimizer state, step 2 the steady one; nothing after that,
    # including around the checkpoint written after step 5
    assert all(s["compiles"] == steps[1]["compiles"] for s in steps[1:]), [s["compiles"] for s in steps]


def test_one_graph_per_step(run_dir):
    steps = full_results()["steps"]
    per_step = [b["executions"] - a["executions"] for a, b in zip(steps, steps[1:])]
    # one execution per step, the steps around the checkpoint after step 5 included. Two mean the trainer
    # computes on step outputs after backend.step_done() (e.g. torch.cat of the values it logs): build the
    # tensor for the host before step_done(), transfer it (.tolist()) after.
    assert per_step == [1] * (len(steps) - 1), per_step
