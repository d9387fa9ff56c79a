"""Save at step 5, resume in a fresh process, continue to 10: the uninterrupted run's losses, with the step
program found in the persistent compilation cache instead of compiled anew."""

import os

from xla_helpers import STEPS, XLA, artifacts, compile_cache, full_run, losses, run_xla


def test_resume_from_step_5_matches_uninterrupted():
    full = full_run()
    ckpt = os.path.join(full, "checkpoints", "step_00000005")
    assert os.path.exists(os.path.join(ckpt, "meta.json"))
    run_dir = os.path.join(artifacts(), "resumed")
    results = run_xla(os.path.join(artifacts(), "resumed.json"),
                      [*XLA, compile_cache(), f"run_dir={run_dir}", f"checkpoint.resume={ckpt}", "checkpoint.every_steps=0",
                       "checkpoint.export_at_end=false"])
    ref, got = losses(full), losses(run_dir)
    assert sorted(got) == list(range(6, STEPS + 1))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])
    # no recompilation in steady state after the resume either
    compiles = [s["compiles"] for s in results["steps"]]
    assert compiles[-1] == compiles[-2] == compiles[-3], compiles
    # the restarted job looked its step program up in the persistent cache the uninterrupted run filled (the
    # lane folder standing in for a host's own disk) and found it: on TPU that is a load instead of a compile
    # (minutes at 70B). The CPU client cannot deserialize its own executables (DeserializeFailure, then it
    # compiles), so here the lookup is what is checked.
    cache = results["cache"]
    assert cache["Hit"] + cache["DeserializeFailure"] >= 1, cache
