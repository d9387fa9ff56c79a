"""parallel=xla_spmd on 4 CPU PJRT devices: the losses of the eager reference, one compiled graph per step, no
host sync between steps, and an export that compiles nothing."""

import pytest
from xla_helpers import STEPS, XLA, assert_matches_reference, eager_reference, full_results, full_run, losses


@pytest.fixture(scope="module")
def run_dir():
    return full_run()


def test_losses_match_eager_reference(run_dir):
    ref = eager_reference(XLA)
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert_matches_reference(run_dir, ref, list(range(1, STEPS + 1)))  # per-domain losses too
    got = losses(run_dir)
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
    # tensor for the host before step_done(), transfer it after.
    assert per_step == [1] * (len(steps) - 1), per_step


def test_no_host_sync_between_steps(run_dir):
    """Step k-1's metrics are read only once step k is traced and dispatched whole (the host traces while the
    device runs step k-1, and waits for k-1 only while the device has k queued): step k's lr and guard are
    computed on the device, so nothing of step k waits for k-1's read. A checkpoint (every 5 steps, and the
    end) reads its own step first."""
    events = [tuple(e) for e in full_results()["events"]]
    expected = [("backward", 1), ("dispatch", 1)]
    for k in range(2, STEPS + 1):
        expected += [("backward", k), ("dispatch", k)]
        if ("read", k - 1) not in expected:
            expected.append(("read", k - 1))
        if k % 5 == 0:  # checkpoint.every_steps=5 (and the end of the run)
            expected.append(("read", k))
    assert events == expected, events


def test_export_compiles_nothing(run_dir):
    # moving sharded weights to the host with .cpu() compiles and runs one replication program per tensor
    assert full_results()["export"] == {"compiles": 0, "executions": 0, "replications": 0}
