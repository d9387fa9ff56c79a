"""Every benchmark in bench/ runs, in its seconds-long smoke mode (`--smoke`: tiny sizes, one round, no target
checked), as `make bench` runs it: a subprocess of its own. So a benchmark cannot rot unnoticed (bench/checkpoint.py
once crashed on a renamed checkpoint figure, bench/trainer_overhead.py on a trainer method its fake loader lacked).
The timings are not looked at; each run must exit 0 and write its JSON (into a temporary folder, never over
bench/results/)."""

import json
import os
import sys

import pytest
from conftest import run_python, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# not benchmarks: the results writer, make bench's runner, and the GPU acceptance check (make gpu-check;
# tests/test_gpu_check.py runs its --dry-run)
NOT_BENCHMARKS = {"results_io.py", "run_all.py", "gpu_check.py"}
SCRIPTS = sorted(name for name in os.listdir(BENCH) if name.endswith(".py") and name not in NOT_BENCHMARKS)


def test_make_bench_runs_every_script():
    sys.path.insert(0, BENCH)
    try:
        import run_all
    finally:
        sys.path.remove(BENCH)
    assert sorted(run_all.BENCHES) == SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_smoke(script, tmp_path):
    env = {**subprocess_env(), "LEMUR_BENCH_RESULTS": str(tmp_path)}
    proc = run_python([os.path.join(BENCH, script), "--smoke"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, (
        f"{script} --smoke exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    name = script[: -len(".py")]
    if script == "xla_step.py" and "skipped (torch_xla is not installed here" in proc.stdout:
        return  # this venv has no torch_xla: the XLA lane runs it (tests/xla/test_xla_bench_smoke.py)
    with open(tmp_path / f"{name}.smoke.json") as f:
        result = json.load(f)
    assert result["smoke"] is True and len(result) > 2, result
