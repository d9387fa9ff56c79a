"""Where every benchmark writes its JSON: bench/results/<name>.json (gitignored). The benchmarks that need a fake
(the one fake loader, batches in the contract, a host backend) take it from tests/fakes.py: `TESTS` is that folder.

A smoke run (`--smoke`: tiny sizes, one round, no target checked) writes <name>.smoke.json instead, into
$LEMUR_BENCH_RESULTS when set (tests/test_bench_smoke.py points it at a temporary folder), so that it never
replaces a measured result.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TESTS = os.path.join(os.path.dirname(HERE), "tests")


def write_result(name: str, result: dict, smoke: bool = False) -> str:
    folder = os.environ.get("LEMUR_BENCH_RESULTS", RESULTS) if smoke else RESULTS
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.smoke.json" if smoke else f"{name}.json")
    with open(path, "w") as f:
        json.dump({**result, "smoke": smoke}, f, indent=1)
    return path
