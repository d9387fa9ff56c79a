"""Resumable sharded checkpoints with torch.distributed.checkpoint: asynchronous saves, committed only when
complete and durable, pruned within their own run, resumed from the checkpoint rank 0 chooses.

Layout of one checkpoint (`<dir>/step_00000100/`): DCP files for the sharded model and optimizer (keys as in
the HF model, so any world size and either backend reads them), `extra_state.pt` (scheduler, loader position,
trainer counters; written by rank 0), `rng/rank_<r>.pt`, `config.yaml` (the resolved run config) and
`meta.json`, written last: the commit marker (lemur_torch.commit). A folder without it is never a checkpoint.

Saving (`checkpoint.async_mode`): `none` writes while training waits. `async` copies the state to host memory
(on a GPU the device-to-host copy is all that blocks the step) and DCP's async_save writes it in a background
thread; `async_pinned` stages into reused pinned buffers in the background too, overlapping the next step's
forward and backward, and the trainer waits for it only before the optimizer changes the weights
(`wait_staged`). At most one save is in flight: the next save, the stop path, the end of the run (and so the
export) wait for it. The extra state is serialized when `save` is called, so it is the saved step's even
though training goes on.

Who knows that a checkpoint is complete: DCP's save ends with its coordinator, rank 0, gathering every rank's
write results (each rank's files fsynced by DCP's writer) and writing the metadata. When rank 0's save has
completed, every rank's part is on storage, so rank 0 alone commits, without another collective: it writes
extra_state.pt and config.yaml, fsyncs the folders (every file was fsynced by its writer, so this does not
grow with the ranks), writes meta.json and renames the folder into place (`checkpoint.commit=rename`), or
leaves it in place (`marker`, for object stores and gcsfuse), then prunes. For asynchronous saves this runs
in the background too. DCP's save planning is cached across saves (parallel/save_plans.py), and the group
asynchronous saves run on is made when the Checkpointer is, on every rank before the first step.

Lineage: a run id is drawn when a run starts fresh and carried over when it resumes (meta.json `run_id`), so
a folder may hold several runs' checkpoints (a `checkpoint.resume=none` run started in an old run's folder).
`keep_last` prunes only this lineage's checkpoints, never another's and never the newest. "Newest" follows
the order of commits (meta.json `commit_seq`: one more than any checkpoint in the folder), not step numbers:
after a fresh start in an old folder, auto-resume continues the new run, not the old one with more steps.
At start, rank 0 finishes or removes interrupted saves (`commit.recover`), picks the checkpoint to resume
from and broadcasts the choice, so every rank loads the same one whatever its view of the file system.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch import commit, faults
from lemur_torch.errors import ConfigError
from lemur_torch.parallel.base import Backend

META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
# how long a rank waits for the checkpoint rank 0 chose to appear in its own view of a shared file system
# (NFS caches directory attributes for up to 60 s by default: acdirmax)
VISIBLE_TIMEOUT_S = 90.0


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class CheckpointInfo:
    path: str
    step: int
    run_id: Optional[str]
    commit_seq: int


def read_meta(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def scan_checkpoints(directory: str) -> List[CheckpointInfo]:
    """Complete checkpoints in `directory`, in commit order (oldest first)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = STEP_DIR.match(name)
        meta = read_meta(os.path.join(directory, name)) if match else None
        if meta is not None:
            found.append(
                CheckpointInfo(
                    os.path.join(directory, name),
                    int(match.group(1)),
                    meta.get("run_id"),
                    int(meta.get("commit_seq", 0)),
                )
            )
    return sorted(found, key=lambda c: (c.commit_seq, c.step))


def list_checkpoints(directory: str) -> List[str]:
    """Paths of the complete checkpoints, oldest commit first."""
    return [c.path for c in scan_checkpoints(directory)]


def latest_checkpoint(directory: str) -> Optional[str]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resolve_async_mode(setting: str, device_type: str) -> str:
    if setting == "auto":
        return "async" if device_type == "cuda" else "none"
    return setting


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _serialized(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@dataclass
class ResumeChoice:
    path: Optional[str]  # None: start fresh
    run_id: str  # the lineage this run continues (or starts)


@dataclass
class _Save:
    """One save in flight."""

    step: int
    final: str
    started: float
    done: Future  # this rank's write; on rank 0, the commit and the pruning too
    blocked_s: float = 0.0  # time the training loop was held by this save
    write_s: Optional[float] = None  # from the call to the commit (rank 0) or to this rank's write


class Checkpointer:
    def __init__(self, cfg: DictConfig, backend: Backend, log: Optional[Callable[[str], None]] = None):
        self.cfg = cfg
        self.ccfg = cfg.checkpoint
        self.backend = backend
        self.directory = self.ccfg.dir
        self.mode = commit.check_mode(self.ccfg.commit)
        self.async_mode = resolve_async_mode(self.ccfg.async_mode, backend.device.type)
        if self.async_mode != "none":
            backend.prepare_async_saves()  # collective: every rank builds its Checkpointer before the first step
        self.log = log or ((lambda msg: print(msg, flush=True)) if backend.is_main else (lambda msg: None))
        self.run_id: Optional[str] = None
        self._in_flight: Optional[_Save] = None
        self._staged: Optional[Future] = None
        self._background: Optional[ThreadPoolExecutor] = None
        self._report: Dict[str, float] = {}

    # -- resume --------------------------------------------------------------------------------------
    def choose_resume(self) -> ResumeChoice:
        """Rank 0 finishes or removes interrupted saves, picks the checkpoint to resume from (by
        `checkpoint.resume`) and the lineage; every rank gets rank 0's answer."""
        answer = None
        if self.backend.is_main:
            try:
                answer = self._choose_on_main()
            except OSError as exc:  # every rank must hear of it, or the others wait in the broadcast
                answer = {"error": f"cannot read or clean up {self.directory}: {exc}"}
        answer = self.backend.broadcast_object(answer)
        if "error" in answer:
            raise ConfigError("checkpoint.resume", answer["error"])
        choice = ResumeChoice(answer["path"], answer["run_id"])
        if choice.path is not None:
            self._wait_visible(choice.path)
        self.run_id = choice.run_id
        return choice

    def _choose_on_main(self) -> Dict[str, Any]:
        resume = self.ccfg.resume
        commit.recover(self.directory, META, STEP_DIR, self.log)
        if resume == "none":
            path = None
        elif resume == "auto":
            path = latest_checkpoint(self.directory)
        elif commit.is_complete(resume, META):
            path = resume
        else:
            return {"error": f"{resume} is not a complete checkpoint (no {META})"}
        meta = read_meta(path) if path else None
        run_id = (meta or {}).get("run_id") or uuid.uuid4().hex[:12]
        others = [c for c in scan_checkpoints(self.directory) if c.run_id != run_id]
        if others:
            self.log(
                f"checkpoint: {self.directory} also holds {len(others)} checkpoint(s) of other runs "
                f"(e.g. {os.path.basename(others[-1].path)}); kept, never pruned by this run ({run_id})"
            )
        return {"path": path, "run_id": run_id}

    def _wait_visible(self, path: str) -> None:
        deadline = time.monotonic() + VISIBLE_TIMEOUT_S
        while not commit.is_complete(path, META):
            if time.monotonic() > deadline:
                raise FileNotFoundError(
                    f"rank {self.backend.rank}: checkpoint {path}, chosen by rank 0, is not visible here after "
                    f"{VISIBLE_TIMEOUT_S:g}s: checkpoint.dir must be on a file system every node shares"
                )
            time.sleep(1.0)

    def load(self, path: str, model, optimizer, scheduler, loader) -> Dict[str, Any]:
        b = self.backend
        state = b.state_dict_for_checkpoint(model, optimizer)
        b.dcp_load(state, path)
        b.load_state_dict_from_checkpoint(model, optimizer, state)
        extra = torch.load(os.path.join(path, "extra_state.pt"), weights_only=False)
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["loader"])
        rng_file = os.path.join(path, "rng", f"rank_{b.rank}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return dict(extra["trainer"])

    # -- save ----------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, scheduler, loader, trainer_state: Dict[str, Any]) -> str:
        """Write checkpoint `step` (collectively). Returns once training may go on: after the write with
        async_mode=none, after staging has started otherwise. Waits for the previous save first."""
        self.wait()
        b = self.backend
        started = time.perf_counter()
        final = os.path.join(self.directory, step_dir_name(step))
        if b.is_main:
            os.makedirs(self.directory, exist_ok=True)
            replaced = read_meta(final)
            if replaced is not None:
                self.log(
                    f"checkpoint: this save replaces {final} (run {replaced.get('run_id')}, step "
                    f"{replaced.get('step')})"
                )
            commit.begin(final, self.mode, META)
        b.barrier()
        folder = commit.staging_path(final, self.mode)
        os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
        commit.write_durable(os.path.join(folder, "rng", f"rank_{b.rank}.pt"), _serialized(_rng_state()))
        loader_state = loader.state_dict()
        # serialized now, so they are this step's even though training goes on while the files are written
        extra = (
            _serialized(
                {
                    "scheduler": scheduler.state_dict(),
                    "loader": loader_state,
                    "trainer": trainer_state,
                    "world_size": b.world_size,
                    "backend": b.name,
                }
            )
            if b.is_main
            else b""
        )
        meta = {
            "step": step,
            "run_id": self.run_id,
            "world_size": b.world_size,
            "backend": b.name,
            **{k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str))},
        }
        state = b.state_dict_for_checkpoint(model, optimizer)
        if self.async_mode == "none":
            b.dcp_save(state, folder)
            done: Future = Future()
            done.set_result(self._finish(None, folder, final, extra, meta, started))
        else:
            self._staged, written = b.dcp_async_save(state, folder, pinned=self.async_mode == "async_pinned")
            if self._background is None:
                self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lemur-checkpoint")
            done = self._background.submit(self._finish, written, folder, final, extra, meta, started)
        self._in_flight = _Save(step, final, started, done, blocked_s=time.perf_counter() - started)
        return final

    def _finish(
        self, written: Optional[Future], folder: str, final: str, extra: bytes, meta: Dict[str, Any], started: float
    ) -> float:
        """After this rank's write: on rank 0 (every rank's write is then complete) commit and prune.
        Returns the seconds since the save was called."""
        if written is not None:
            written.result()
        if self.backend.is_main:
            faults.before_commit()
            commit.write_durable(os.path.join(folder, "extra_state.pt"), extra)
            commit.write_durable(
                os.path.join(folder, "config.yaml"), OmegaConf.to_yaml(self.cfg, resolve=True).encode()
            )
            seq = max((c.commit_seq for c in scan_checkpoints(self.directory)), default=0) + 1
            meta = {**meta, "commit_seq": seq, "time": time.time()}
            # every file was fsynced by its writer before rank 0 got here (DCP's writer, write_durable)
            commit.commit(folder, final, self.mode, META, json.dumps(meta, indent=1).encode(), files_synced=True)
            self._prune()
        return time.perf_counter() - started

    def _prune(self) -> None:
        found = scan_checkpoints(self.directory)
        mine = [c for c in found if c.run_id == self.run_id]
        for c in mine[: -self.ccfg.keep_last]:
            if c.path == found[-1].path:
                continue  # the newest checkpoint is never deleted, whoever wrote it
            commit.remove(c.path, META)
            self.log(f"checkpoint: pruned {c.path} (checkpoint.keep_last={self.ccfg.keep_last} of run {self.run_id})")

    # -- wait points ---------------------------------------------------------------------------------
    def wait_staged(self) -> None:
        """Return once the save in flight no longer reads the live state (call before the optimizer step)."""
        if self._staged is None:
            return
        t0 = time.perf_counter()
        self._staged.result()
        self._staged = None
        if self._in_flight is not None:
            self._in_flight.blocked_s += time.perf_counter() - t0

    def wait(self) -> None:
        """Return once the save in flight is written (and, on rank 0, committed); raises its error."""
        save = self._in_flight
        if save is None:
            return
        self.wait_staged()
        t0 = time.perf_counter()
        try:
            save.write_s = save.done.result()
        finally:
            self._in_flight = None
            save.blocked_s += time.perf_counter() - t0
        self._record(save)

    def in_flight(self) -> bool:
        """Whether a save is still being written here (or, on rank 0, committed): an asynchronous one."""
        return self._in_flight is not None and not self._in_flight.done.done()

    def finalize(self) -> None:
        """Wait for the save in flight on every rank, then together: when this returns anywhere, the newest
        checkpoint is committed (the stop path and the end of the run)."""
        self.wait()
        self.backend.barrier()

    def close(self) -> None:
        """On the way out after an error: let the save in flight finish (it holds an earlier, healthy step),
        logging rather than raising its own failure, which would hide the error that ended the run."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001
            self.log(f"checkpoint: the save in flight failed too: {type(exc).__name__}: {exc}")
        if self._background is not None:
            self._background.shutdown(wait=True)
            self._background = None

    def stats(self) -> Dict[str, float]:
        """The figures of a save completed since the last call (for the step metrics), then nothing."""
        if self._in_flight is not None and self._in_flight.done.done() and self._staged is None:
            self.wait()
        report, self._report = self._report, {}
        return report

    def _record(self, save: _Save) -> None:
        self._report = {"ckpt_step": save.step, "ckpt_blocked_s": save.blocked_s, "ckpt_write_s": save.write_s}
        how = (
            "written while training waited"
            if self.async_mode == "none"
            else f"written in the background ({self.async_mode})"
        )
        self.log(
            f"checkpoint {save.final} {how}: training blocked {save.blocked_s:.2f}s, "
            f"saved and committed in {save.write_s:.2f}s"
        )
