"""Main lane (torch 2.13, no torch_xla) reading what the XLA lane's runs wrote ($LEMUR_XLA_ARTIFACTS):
the HF export loads in plain transformers with the XLA model's logits, and the XLA backend's DCP checkpoints
are read by lemur-export and by the FSDP backend (resume and fine-tuning)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import losses, run_train

ART = os.environ.get("LEMUR_XLA_ARTIFACTS", "")
FULL = os.path.join(ART, "full")
# Outside the lane there is nothing to read; inside it (run.sh sets the variable) missing artifacts fail.
pytestmark = pytest.mark.skipif(not ART, reason="run through tests/xla/run.sh, which sets LEMUR_XLA_ARTIFACTS")


def test_xla_lane_wrote_its_artifacts():
    assert os.path.exists(os.path.join(ART, "full.json")), f"the XLA runs wrote nothing to {ART}"


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xla_helpers import BASE, STEPS  # noqa: E402


def _logits(folder, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def test_hf_export_reproduces_xla_logits():
    saved = torch.load(os.path.join(ART, "full.json.logits.pt"))
    got = _logits(os.path.join(FULL, "hf"), saved["batch"])
    assert got.shape == saved["logits"].shape
    assert (got - saved["logits"]).abs().max().item() < 1e-4


def _safetensors(folder):
    from safetensors.torch import load_file

    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    out = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def test_lemur_export_of_xla_checkpoint(tmp_path):
    out = str(tmp_path / "hf")
    ckpt = os.path.join(FULL, "checkpoints", f"step_{STEPS:08d}")
    cmd = [os.path.join(os.path.dirname(sys.executable), "lemur-export"), ckpt, out]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    got, ref = _safetensors(out), _safetensors(os.path.join(FULL, "hf"))
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_fsdp_resumes_xla_checkpoint(tmp_path):
    """Same DCP keys and optimizer layout: the FSDP backend continues an XLA run where it stopped."""
    run_dir = str(tmp_path / "fsdp")
    ckpt = os.path.join(FULL, "checkpoints", "step_00000005")
    run_train(
        [
            *BASE,
            "parallel=fsdp",
            f"run_dir={run_dir}",
            f"checkpoint.resume={ckpt}",
            "checkpoint.every_steps=0",
            "checkpoint.export_at_end=false",
        ]
    )
    ref, got = losses(FULL), losses(run_dir)
    assert sorted(got) == list(range(6, STEPS + 1))
    for step in got:
        assert abs(got[step] - ref[step]) < 1e-4, (step, got[step], ref[step])


def test_fsdp_finetunes_xla_export(tmp_path):
    run_dir = str(tmp_path / "ft")
    run_train(
        [
            *BASE,
            "parallel=fsdp",
            f"model.pretrained={os.path.join(FULL, 'hf')}",
            "train.max_steps=2",
            f"run_dir={run_dir}",
            "checkpoint.export_at_end=false",
        ]
    )
    got, xla = losses(run_dir), losses(FULL)
    # the same first batch as the XLA run's step 1: the trained weights are well below the random init's loss
    assert got[1] < xla[1] - 0.3, (got, xla[1])
