"""`make bench`: run every benchmark in bench/ in turn; each prints its ratios and writes bench/results/*.json."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ["trainer_overhead.py", "data_pipeline.py", "attention.py", "checkpoint.py", "eval.py", "validation.py"]


def main() -> int:
    failed = []
    for name in BENCHES:
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            continue
        print(f"== {name}", flush=True)
        if subprocess.call([sys.executable, path]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
