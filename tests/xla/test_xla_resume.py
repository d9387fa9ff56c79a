"""Save at step 5, resume in a fresh process, continue to 10: the uninterrupted run's losses."""

import os

from xla_helpers import STEPS, XLA, artifacts, full_run, losses, run_xla


def test_resume_from_step_5_matches_uninterrupted():
    full = full_run()
    ckpt = os.path.join(full, "checkpoints", "step_00000005")
    assert os.path.exists(os.path.join(ckpt, "meta.json"))
    run_dir = os.path.join(artifacts(), "resumed")
    results = run_xla(os.path.join(artifacts(), "resumed.json"),
                      [*XLA, f"run_dir={run_dir}", f"checkpoint.resume={ckpt}", "checkpoint.every_steps=0",
                       "checkpoint.export_at_end=false"])
    ref, got = losses(full), losses(run_dir)
    assert sorted(got) == list(range(6, STEPS + 1))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])
    # no recompilation in steady state after the resume either (the first steps compile the step graphs
    # and, with the current trainer, its small host-side logging graphs as new branches appear)
    compiles = [s["compiles"] for s in results["steps"]]
    assert compiles[-1] == compiles[-2] == compiles[-3], compiles
