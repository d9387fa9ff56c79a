"""An exception raised while a step is being traced reaches the user as itself: lemur-train exits with Python's
status 1 and the error as its last line, not with a crash that hides it.

The case is the one that did crash: the decoder layers' scan (parallel.scan_layers) with JAX unreachable, as
when torchax could not be imported, fails in the middle of the first forward's trace ("Jax is required for
this feature"); running that half-built graph afterwards (the backend's shutdown used to) ended the process
with SIGSEGV before the error was printed."""

import os
import subprocess
import sys

from xla_helpers import XLA, artifacts, xla_env

# lemur-train where torchax cannot be imported (torch_xla then has no JAX bridge for its scan)
WITHOUT_TORCHAX = r"""
import sys

class NoTorchax:
    def find_spec(self, name, path=None, target=None):
        if name == "torchax" or name.startswith("torchax."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoTorchax())
from lemur_torch import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_exception_inside_the_trace_ends_with_its_message():
    run_dir = os.path.join(artifacts(), "scan_without_jax")
    overrides = [
        *XLA,
        "parallel.scan_layers=true",
        "train.max_steps=2",
        "checkpoint.save_at_end=false",
        "checkpoint.export_at_end=false",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCHAX, *overrides], env=xla_env(), capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, f"exit {proc.returncode} (negative: killed by a signal)\n{proc.stderr[-3000:]}"
    assert lines[-1] == "AssertionError: Jax is required for this feature", proc.stderr[-3000:]
