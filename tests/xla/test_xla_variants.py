"""The other paths through the backend: a 2-D (fsdp x tensor) mesh with Megatron-style projection splits,
and pretrained HF safetensors loaded piece by piece into the shards, against the eager reference."""

import os

from xla_helpers import XLA, artifacts, eager_reference_losses, full_run, losses, run_xla


def test_tensor_parallel_mesh_from_pretrained_matches_eager():
    pretrained = os.path.join(full_run(), "hf")  # the XLA run's own export: trained, not random weights
    overrides = [*XLA, "train.max_steps=3", f"model.pretrained={pretrained}"]
    run_dir = os.path.join(artifacts(), "tp2")
    results = run_xla(os.path.join(artifacts(), "tp2.json"),
                      [*overrides, "parallel.xla_tensor=2", f"run_dir={run_dir}", "checkpoint.every_steps=0",
                       "checkpoint.save_at_end=false", "checkpoint.export_at_end=false"])
    got, ref = losses(run_dir), eager_reference_losses(overrides)
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])
    assert got[1] < losses(full_run())[1] - 0.3, "the pretrained weights were not loaded"
    assert len(results["steps"]) == 3
