"""bench/gpu_check.py --dry-run: every item of the GPU acceptance check at tiny shapes on CPU passes, and the
items that need CUDA say so."""

import json
import os

import pytest
from conftest import run_python

pytestmark = pytest.mark.slow  # every test here starts processes

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_check.py")


def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_python([SCRIPT, "--dry-run", f"--out={out}"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["failures"] == []
    items = result["items"]
    for name in (
        "attention flash",
        "attention sdpa",
        "attention flex",
        "train bf16, full AC",
        "train bf16, selective AC",
        "checkpoint",
        "export",
        "train float8 rowwise, full AC",
        "float8 rowwise",
        "train float8 tensorwise, full AC",
        "float8 tensorwise",
    ):
        assert items[name]["ok"], (name, items[name])
    skipped = {"sync-free step", "sync-free step, float8 tensorwise", "compile", "flash and flex kernels"}
    assert set(result["skipped"]) == skipped
    assert items["train bf16, selective AC"]["max_rel_loss_diff_to_full_ac"] == 0.0  # recomputation changes nothing
    assert "28 of 28 eligible linears" in items["train float8 tensorwise, full AC"]["text"]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(items)  # one line per item, printed as it ran
