"""Every way lemur-torch ends a run on purpose, as one exception hierarchy; each class carries its exit status.

`lemur-train` (train.py `main`) turns an exception into its exit status and the one line it prints by the
exception's class (`exit_code`, `one_line()`), never by its message text. The statuses:

- 2 `InputError`: an input the user fixes (a config key, a data source, a path, weights, a refused resume);
  `ConfigError` names the key, `DataConfigError` the source, `BadInputError` the file and line of a bad record;
- 3 `NonFiniteError`: too many consecutive steps with a non-finite loss or gradient norm;
- 4 `DataReadError`: a source failed for good mid-run (after retries); the last completed step is checkpointed;
- `train.preempt_exit_code` (124) `Preempted`: a stop signal was honoured with a checkpoint (the job requeues);
- `train.hang_exit_code` (125) `Hang`: the step watchdog found the loop stuck (lemur_torch/watchdog.py).

Messages are for people. Every class pickles with its fields, so an error crosses a DataLoader worker or an
object broadcast between ranks as itself.
"""

from __future__ import annotations


class LemurError(Exception):
    """Base class. `exit_code`: the process's exit status; `one_line()`: what the user reads on stderr."""

    exit_code: int = 1
    prefix: str = ""  # what one_line() starts with, before the message

    def one_line(self) -> str:
        lines = [line.strip() for line in str(self).splitlines() if line.strip()]
        if "Original Traceback" in str(self):  # re-raised from a DataLoader worker: its last line is the message
            lines = [lines[-1].split(": ", 1)[-1]]
        return self.prefix + " ".join(lines)


class InputError(LemurError, ValueError):
    """An input the user can fix: exit status 2."""

    exit_code = 2


class ConfigError(InputError):
    """A config key with a bad value; str() is one line naming the key."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config error at '{key}': {message}")

    def __reduce__(self):
        return type(self), (self.key, self.message)


class DataConfigError(InputError):
    """A data source that cannot be used as configured; the message names the source and what to fix."""

    prefix = "data error: "


class BadInputError(InputError):
    """A record that cannot be used with data.strict=true (or a source with no usable record at all); the
    message names the file and line."""

    prefix = "data error: "


class NonFiniteError(LemurError, RuntimeError):
    """The run aborted after train.max_nonfinite_steps consecutive non-finite steps: exit status 3."""

    exit_code = 3
    prefix = "aborted: "


class DataReadError(LemurError, RuntimeError):
    """A read that kept failing after every retry (network, object store, file system): exit status 4. Raised
    mid-run on every rank at the same micro-batch; the trainer checkpoints the last completed step first."""

    exit_code = 4
    prefix = "aborted on a data read error: "

    def one_line(self) -> str:
        return super().one_line() + "; the last completed step is checkpointed: fix the source and rerun to resume"


class Preempted(LemurError):
    """A stop signal (SIGTERM, SIGUSR1) was honoured: the reached step is checkpointed. Its exit status is
    train.preempt_exit_code, which the job scripts requeue on."""

    def __init__(self, step: int, exit_code: int):
        self.step, self.exit_code = step, exit_code
        super().__init__(f"stop signal honoured: checkpoint at step {step}, exiting for requeue")

    def __reduce__(self):
        return type(self), (self.step, self.exit_code)


class Hang(LemurError):
    """The step watchdog found no progress for train.hang_timeout_s: exit status train.hang_exit_code. Raised
    by nobody: the watchdog's thread prints it and ends the process (the main thread may be stuck for good)."""

    def __init__(self, rank: int, step: int, timeout_s: float, exit_code: int):
        self.rank, self.step, self.timeout_s, self.exit_code = rank, step, timeout_s, exit_code
        super().__init__(
            f"lemur-train rank {rank}: step watchdog: no progress for train.hang_timeout_s={timeout_s:g}s after "
            f"step {step} (a peer stopped responding, or this rank is stuck); stacks of every thread follow; "
            f"exiting with status {exit_code} so that the job restarts from its last checkpoint"
        )

    def __reduce__(self):
        return type(self), (self.rank, self.step, self.timeout_s, self.exit_code)
