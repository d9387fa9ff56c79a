"""bench/xla_step.py in its smoke mode (`--smoke`: 2 decoder layers, unrolled and scanned, 2 steady steps), here
where torch_xla is installed: the main lane's tests/test_bench_smoke.py runs every other benchmark, and this one
only as far as its "skipped" line. The timings are not looked at; the run must exit 0 and write its JSON (into a
temporary folder, never over bench/results/)."""

import json
import os
import subprocess
import sys

from xla_helpers import xla_env

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


def test_xla_step_smoke(tmp_path):
    env = {**xla_env(), "LEMUR_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, os.path.join(BENCH, "xla_step.py"), "--smoke"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (
        f"xla_step.py --smoke exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    assert "skipped" not in proc.stdout, proc.stdout  # this venv has torch_xla: the benchmark itself must run
    with open(tmp_path / "xla_step.smoke.json") as f:
        result = json.load(f)
    assert result["smoke"] is True and len(result) > 2, result
