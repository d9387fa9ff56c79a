"""Step watchdog: ends a process whose training loop stopped making progress, so the job can restart.

A rank whose peer died inside a collective, or whose file system stopped answering, can wait for a very long
time (NCCL and gloo time out only after the process group's timeout, 30 minutes by default, and some waits
never do). The trainer calls `beat()` at the top of every loop iteration; if the next beat does not come within
`train.hang_timeout_s` (one step, including its checkpoint's blocking part and the data wait), the watchdog
writes one line saying so, dumps the stack of every thread (faulthandler) to stderr, and exits with
`train.hang_exit_code`. Every rank has its own watchdog, so the stuck rank and the ranks waiting for it all
exit; the launcher then ends the job, and the job script requeues it (launch/slurm/job.sh).

The watchdog is a Python thread, which needs the interpreter lock to run. A C extension that holds the lock
forever would keep it from firing, so faulthandler's own C-level timer is armed as a backstop at twice the
timeout: it dumps the stacks and exits (status 1) without the lock.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Optional

from lemur_torch.errors import Hang


class StepWatchdog:
    def __init__(self, timeout_s: Optional[float], exit_code: int, rank: int):
        self.timeout_s = float(timeout_s) if timeout_s else None
        self.exit_code = exit_code
        self.rank = rank
        self._deadline = float("inf")
        self._step = 0
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "StepWatchdog":
        if self.timeout_s is not None:
            self._thread = threading.Thread(target=self._watch, name="lemur-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """The loop made progress (it is about to run step `step + 1`): restart the clock."""
        if self.timeout_s is None:
            return
        self._step = step
        self._deadline = time.monotonic() + self.timeout_s
        faulthandler.dump_traceback_later(2 * self.timeout_s, exit=True, file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._deadline = float("inf")
        faulthandler.cancel_dump_traceback_later()
        self._wake.set()
        self._thread.join()
        self._thread = None

    def _watch(self) -> None:
        while not self._wake.wait(timeout=min(1.0, self.timeout_s / 4)):
            if time.monotonic() > self._deadline:
                self._fire()

    def _fire(self) -> None:
        sys.stderr.write(str(Hang(self.rank, self._step, self.timeout_s, self.exit_code)) + "\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(self.exit_code)
