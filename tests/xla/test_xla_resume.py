"""Save at step 5, resume in a fresh process, continue to 10: the uninterrupted run's losses, with the step
program found in the persistent compilation cache instead of compiled anew.

The full run commits its checkpoints with the completion marker (`checkpoint.commit=marker`: written in
place, meta.json last, as on gcsfuse or an object store where a folder cannot be renamed atomically). The
resumed run finds, beside that checkpoint, a later one whose save died before its marker: it must ignore
(and remove) that one and resume from the complete one."""

import os
import shutil

from xla_helpers import STEPS, XLA, artifacts, compile_cache, full_run, losses, run_xla


def test_marker_committed_checkpoint_resumes_and_one_without_marker_is_ignored():
    full = full_run()
    ckpt = os.path.join(full, "checkpoints", "step_00000005")
    assert os.path.exists(os.path.join(ckpt, "meta.json"))
    assert not [n for n in os.listdir(os.path.join(full, "checkpoints")) if n.startswith(".tmp-")], (
        "marker mode stages in place"
    )
    # the resumed job's checkpoint folder: the complete step 5, and step 8 written up to its marker only
    ckpt_dir = os.path.join(artifacts(), "resumed-checkpoints")
    shutil.copytree(ckpt, os.path.join(ckpt_dir, "step_00000005"))
    incomplete = os.path.join(ckpt_dir, "step_00000008")
    shutil.copytree(os.path.join(full, "checkpoints", "step_00000010"), incomplete)
    os.remove(os.path.join(incomplete, "meta.json"))
    run_dir = os.path.join(artifacts(), "resumed")
    results = run_xla(
        os.path.join(artifacts(), "resumed.json"),
        [
            *XLA,
            compile_cache(),
            f"run_dir={run_dir}",
            f"checkpoint.dir={ckpt_dir}",
            "checkpoint.commit=marker",
            "checkpoint.resume=auto",
            "checkpoint.every_steps=0",
            "checkpoint.export_at_end=false",
        ],
    )
    assert not os.path.exists(incomplete), "a folder without its marker is removed at start, never loaded"
    ref, got = losses(full), losses(run_dir)
    assert sorted(got) == list(range(6, STEPS + 1))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])
    assert os.path.exists(os.path.join(ckpt_dir, f"step_{STEPS:08d}", "meta.json"))
    # no recompilation in steady state after the resume either
    compiles = [s["compiles"] for s in results["steps"]]
    assert compiles[-1] == compiles[-2] == compiles[-3], compiles
    # the restarted job looked its step program up in the persistent cache the uninterrupted run filled (the
    # lane folder standing in for a host's own disk) and found it: on TPU that is a load instead of a compile
    # (minutes at 70B). The CPU client cannot deserialize its own executables (DeserializeFailure, then it
    # compiles), so here the lookup is what is checked.
    cache = results["cache"]
    assert cache["Hit"] + cache["DeserializeFailure"] >= 1, cache
