"""Test-only fault injection, switched on by environment variables. Nothing here does anything unless one of
them is set; never set them in a real run. The tests use them to make a rank stop responding, to slow a run down
and to hold a checkpoint open long enough to kill a run in the middle of it.

LEMUR_TEST_HANG="<rank>:<step>:<seconds>[:<once-file>]"
    global rank <rank> sleeps <seconds> before training step <step>, like a rank whose peer died in a
    collective or whose file system stopped answering. With <once-file>, only while that file does not exist
    (it is created when the sleep starts), so a restarted job runs through.
LEMUR_TEST_STEP_DELAY_S="<seconds>"
    every rank sleeps that long before every training step: a run slow enough for a test to reach a Slurm time
    limit in the middle of it.
LEMUR_TEST_SAVE_DELAY_S="<seconds>"
    rank 0 waits that long between a checkpoint's data being written and its commit (in the background for
    asynchronous saves), so that a test can kill the run while the checkpoint is incomplete.
"""

from __future__ import annotations

import os
import sys
import time


def before_step(step: int, rank: int) -> None:
    delay = float(os.environ.get("LEMUR_TEST_STEP_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    spec = os.environ.get("LEMUR_TEST_HANG")
    if not spec:
        return
    parts = spec.split(":", 3)
    hang_rank, hang_step, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    once = parts[3] if len(parts) > 3 else None
    if rank != hang_rank or step != hang_step or (once and os.path.exists(once)):
        return
    if once:
        open(once, "w").close()
    print(f"LEMUR_TEST_HANG: rank {rank} sleeps {seconds:g}s before step {step}", file=sys.stderr, flush=True)
    time.sleep(seconds)


def before_commit() -> None:
    delay = float(os.environ.get("LEMUR_TEST_SAVE_DELAY_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)
