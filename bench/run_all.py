"""`make bench`: run every benchmark in bench/ in turn; each prints its ratios and writes bench/results/*.json.
xla_step.py runs in the XLA lane's venv (.venv-xla, built by `make test-xla`); without it, it is skipped
and says so. `make bench ARGS=--smoke` runs each in its seconds-long smoke mode (tests/test_bench_smoke.py runs
them one by one)."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = [
    "trainer_overhead.py",
    "data_pipeline.py",
    "attention.py",
    "checkpoint.py",
    "eval.py",
    "validation.py",
    "xla_step.py",
    "float8.py",
]
XLA_PYTHON = os.environ.get("LEMUR_XLA_VENV", os.path.join(os.path.dirname(HERE), ".venv-xla")) + "/bin/python"


def interpreter(name: str):
    if name != "xla_step.py":
        return sys.executable
    return XLA_PYTHON if os.path.exists(XLA_PYTHON) else None


def main(argv=None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)  # e.g. --smoke, passed on to every benchmark
    failed = []
    for name in BENCHES:
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            continue
        print(f"== {name}", flush=True)
        python = interpreter(name)
        if python is None:
            print(
                f"{name}: skipped: no XLA venv at {os.path.dirname(os.path.dirname(XLA_PYTHON))} (make test-xla "
                "builds it)"
            )
            continue
        if subprocess.call([python, path, *extra]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
