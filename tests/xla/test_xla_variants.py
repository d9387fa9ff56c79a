"""The recipe's shapes on the other paths through the backend: seq_len 256 with the loss chunked below and at
the sequence length, a 2-D (fsdp x tensor) mesh with Megatron-style projection splits and its minibatch input,
pretrained HF safetensors read into the shards, and checkpoints of that mesh that hold every tensor and resume
in a fresh process on the same mesh and on another one. Everything against the eager reference."""

import json
import os

import pytest
from xla_helpers import (
    LAYERS,
    XLA,
    artifacts,
    assert_matches_reference,
    eager_reference,
    full_run,
    losses,
    read_metrics,
    run_xla,
)

# seq 256, one micro-batch of 4 rows (one per device) per step; the full run's export as starting weights
SEQ = ["train.seq_len=256", "train.micro_batch_size=4", "train.global_batch_tokens=1024", "train.max_steps=4"]
NO_SAVE = ["checkpoint.every_steps=0", "checkpoint.save_at_end=false", "checkpoint.export_at_end=false"]


def _pretrained():
    return os.path.join(full_run(), "hf")  # the XLA run's own export: trained, not random weights


def _run(name, overrides):
    run_dir = os.path.join(artifacts(), name)
    results = os.path.join(artifacts(), f"{name}.json")
    if not os.path.exists(results):
        run_xla(results, [*XLA, *SEQ, f"model.pretrained={_pretrained()}", f"run_dir={run_dir}", *overrides])
    with open(results) as f:
        return run_dir, json.load(f)


@pytest.fixture(scope="module")
def reference():
    return eager_reference([*XLA, *SEQ, f"model.pretrained={_pretrained()}"])


@pytest.fixture(scope="module")
def tp2():
    """xla_tensor=2 (a 2x2 mesh), loss_chunk 64 (4 chunks per row), a checkpoint after step 2."""
    return _run(
        "tp2",
        [
            "parallel.xla_tensor=2",
            "train.loss_chunk=64",
            "checkpoint.every_steps=2",
            "checkpoint.save_at_end=false",
            "checkpoint.export_at_end=false",
        ],
    )


def _ckpt(tp2_dir):
    return os.path.join(tp2_dir, "checkpoints", "step_00000002")


def _assert_steady(results, first):
    steps = results["steps"]
    compiles = [s["compiles"] for s in steps]
    assert all(c == compiles[first] for c in compiles[first:]), compiles
    per_step = [b["executions"] - a["executions"] for a, b in zip(steps, steps[1:])]
    assert per_step == [1] * (len(steps) - 1), per_step


def test_2d_mesh_seq256_chunked_loss_from_pretrained_matches_eager(tp2, reference):
    run_dir, results = tp2
    assert_matches_reference(run_dir, reference, [1, 2, 3, 4])  # per-domain losses too
    assert losses(run_dir)[1] < losses(full_run())[1] - 0.3, "the pretrained weights were not loaded"
    _assert_steady(results, first=1)  # one graph per step, nothing compiled after step 2


def test_2d_mesh_checkpoint_holds_every_tensor(tp2):
    """torch_xla's planner used to drop tensors replicated over a host's devices (norms, embeddings,
    lm_head and their Adam moments on an fsdp x tensor mesh)."""
    import torch.distributed.checkpoint as dcp

    saved = set(dcp.FileSystemReader(_ckpt(tp2[0])).read_metadata().state_dict_metadata)
    with open(os.path.join(_pretrained(), "model.safetensors.index.json")) as f:
        hf_keys = set(json.load(f)["weight_map"])
    assert len(hf_keys) == 1 + 9 * LAYERS + 2  # embeddings, 9 tensors per layer, norm, lm_head
    missing = [k for k in sorted(hf_keys) if f"model.{k}" not in saved]
    missing += [
        f"{k}.{m}" for k in sorted(hf_keys) for m in ("exp_avg", "exp_avg_sq") if f"optim.state.{k}.{m}" not in saved
    ]
    assert not missing, missing


@pytest.mark.parametrize("tensor,chunk", [(2, 64), (1, 256)])
def test_resume_2d_mesh_checkpoint_in_fresh_process(tp2, reference, tensor, chunk):
    """The xla_tensor=2 checkpoint resumes on the same mesh and on a 1-D one (with the loss unchunked): the
    uninterrupted run's steps 3 and 4, and the eager reference's."""
    run_dir, results = _run(
        f"tp2-resume-{tensor}",
        [f"parallel.xla_tensor={tensor}", f"train.loss_chunk={chunk}", f"checkpoint.resume={_ckpt(tp2[0])}", *NO_SAVE],
    )
    got, uninterrupted = losses(run_dir), losses(tp2[0])
    assert sorted(got) == [3, 4]
    for step in got:
        assert abs(got[step] - uninterrupted[step]) < 1e-5, (step, got[step], uninterrupted[step])
    assert_matches_reference(run_dir, reference, [3, 4])
    # One program per step, the first resumed step's included: every tensor the step reads (the loaded weights
    # and moments, the on-device lr and count of applied updates) is placed as the step returns it
    # (Backend.replicated), so nothing is compiled after the first resumed step.
    _assert_steady(results, first=0)
    assert [m["step"] for m in read_metrics(run_dir)] == [3, 4]
