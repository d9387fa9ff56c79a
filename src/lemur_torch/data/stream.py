"""The rows of one rank: the lanes' packers (one per lane and source), the rows a rank or DataLoader worker owns
(loader.py's module docstring, "Who reads what"), and a reader's failure handed on as a stream item.

`RowStream` is the IterableDataset a DataLoader's workers iterate (or the loader itself, without workers): from
global row `start` it yields the rows g = start + dp_rank + dp_size * (worker + num_workers * j), each with its
domain id, its lane and that lane's new state, and runs (then drops) the rows of a shared lane that other
readers own. A reader that fails for good yields a `ReadFailure` and stops. Workers ignore the signals that stop
a run (`ignore_stop_signals`): the trainer owns the shutdown.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lemur_torch.data.encode import Tokenize
from lemur_torch.data.packing import BadCounter, Packer, Refiller
from lemur_torch.errors import BadInputError, DataReadError

_FAILURES = {"DataReadError": DataReadError, "BadInputError": BadInputError}
# the trainer's stop signals (lemur_torch.trainer.StopSignal) and Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: the worker ignores the signals that stop a run. Slurm (scancel, the
    time limit, preemption) signals every process of a job and torchrun passes a signal on to each rank's whole
    process group, so the workers get it too; one that died of it would make the DataLoader raise in the trainer
    ("DataLoader worker ... is killed by signal") before the step reached is checkpointed. The trainer finishes
    its step, checkpoints and exits, and the DataLoader then ends its workers (they also exit when it dies)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_worker_iterators: "weakref.WeakSet" = weakref.WeakSet()


def end_workers_at_exit(iterator):
    """Track a DataLoader iterator with workers so that interpreter exit ends them; returns it. multiprocessing's
    exit hook SIGTERMs daemonic children and then joins them: it would wait forever for workers that ignore
    SIGTERM (`ignore_stop_signals`) when a run ends on an error with the iterator still open (seen: a
    strict-data error, exit 2, then a hang). This hook, registered later, runs first: it shuts the workers down
    the DataLoader's own way (the done event; what the iterator's __del__ does), then SIGKILLs any still alive."""
    if not _worker_iterators:
        atexit.unregister(_end_workers)
        atexit.register(_end_workers)
    _worker_iterators.add(iterator)
    return iterator


def _end_workers() -> None:
    for iterator in list(_worker_iterators):
        try:
            iterator._shutdown_workers()  # torch's own shutdown, as __del__ runs it; a no-op the second time
        except Exception:  # the process is exiting: a worker that will not end is killed below
            pass
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class ReadFailure:
    """A reader's permanent failure, handed on as a stream item (crosses worker processes and threads intact)."""

    def __init__(self, kind: str, message: str):
        self.kind, self.message = kind, message

    def error(self) -> Exception:
        return _FAILURES[self.kind](self.message)


class Lane:
    """One lane's packers (one per source, made when the schedule first asks for it) and its rows made so far."""

    def __init__(self, lane: int, ctx: "RowStream", state: Optional[dict]):
        self.lane, self.ctx = lane, ctx
        state = state or {}
        self.m: int = state.get("m", 0)  # rows this lane has produced = its rows below the current global row
        self._initial = dict(state.get("src", {}))
        self.packers: Dict[int, Packer] = {}

    def next_row(self):
        ctx = self.ctx
        s = ctx.schedule.source_at(self.lane + ctx.lanes * self.m)
        packer = self.packers.get(s)
        if packer is None:
            src = ctx.sources[s]
            # read-ahead in proportion to the source's share of rows: every packer's chunk then lasts about as long,
            # and a small source does not hold (or, at the end of a run, waste) as much tokenized text as a big one.
            # A quarter of the lane's read_chars: the Refiller gathers several packers' chunks into each tokenizer
            # call of read_chars, so small chunks keep the read-ahead small without shrinking the batches
            chunk = max(16384, ctx.read_chars * ctx.schedule.weights[s] // ctx.schedule.period // 4)
            packer = ctx.packer_cls(
                src,
                self.lane,
                ctx.lanes,
                ctx.seq_len,
                ctx.tokenize,
                ctx.bad,
                chunk,
                self._initial.get(src.name),
                ctx.refiller,
            )
            self.packers[s] = packer
        row = packer.next_row(ctx.attend_across_documents)
        self.m += 1
        return s, row

    def state(self) -> dict:
        src = dict(self._initial)
        for s, p in self.packers.items():
            src[self.ctx.sources[s].name] = p.state()
        return {"m": self.m, "src": src}


class RowStream(IterableDataset):
    """The rows of one rank from global row `start` on; in a DataLoader worker, that worker's share of them."""

    def __init__(
        self,
        sources,
        schedule,
        domain_of,
        tokenizer,
        seq_len,
        lanes,
        read_chars,
        attend_across_documents,
        strict,
        log_bad,
        start,
        dp_rank,
        dp_size,
        num_workers,
        lane_states,
        prefetch_threads=0,
        packer_cls=Packer,
        make_tokenize=Tokenize,
    ):
        self.sources, self.schedule, self.domain_of = sources, schedule, domain_of
        self.tokenizer, self.seq_len, self.lanes, self.read_chars = tokenizer, seq_len, lanes, read_chars
        self.attend_across_documents, self.strict, self.log_bad = attend_across_documents, strict, log_bad
        self.start, self.dp_rank, self.dp_size, self.num_workers = start, dp_rank, dp_size, max(1, num_workers)
        self.lane_states = lane_states
        self.prefetch_threads = prefetch_threads
        self.packer_cls, self.make_tokenize = packer_cls, make_tokenize

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self.tokenize = self.make_tokenize(self.tokenizer)
        self.bad = BadCounter(self.strict, self.log_bad)
        self.pool = None
        if self.prefetch_threads > 0:
            # prefetch_threads > 0 means "read ahead in the background", 0 means inline. Two reads in flight
            # (Refiller): each is one batched tokenizer call over the cores, and the second keeps them busy
            # while the first finishes its longest document or converts its ids
            self.pool = ThreadPoolExecutor(2, thread_name_prefix="lemur-data")
        self.refiller = Refiller(self.tokenize, self.pool, depth=2, batch_chars=self.read_chars)
        stride = self.dp_size * self.num_workers
        lanes: Dict[int, Lane] = {}
        g = self.start + self.dp_rank + self.dp_size * worker
        finalizing = sys.is_finalizing  # held by the frame: module globals are gone when it runs at exit
        try:
            while True:
                lane_id, m = g % self.lanes, g // self.lanes
                try:
                    lane = lanes.get(lane_id)
                    if lane is None:
                        lane = lanes[lane_id] = Lane(lane_id, self, self.lane_states.get(lane_id))
                    while lane.m < m:  # rows of a shared lane that other workers own: made, then dropped
                        lane.next_row()
                    s, (ids, labels, pos) = lane.next_row()
                except (DataReadError, BadInputError) as exc:
                    yield ReadFailure(type(exc).__name__, str(exc))
                    return
                row = torch.stack([torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(pos)])
                yield row, self.domain_of[s], lane_id, lane.state()
                g += stride
        finally:
            # An iterator still referenced at interpreter exit is finalized after concurrent.futures has stopped
            # and joined its workers (threading's atexit hook); shutdown() would then only trip over torn-down
            # module globals (AttributeError: 'NoneType' object has no attribute 'Empty'), with nothing to stop
            if self.pool is not None and not finalizing():
                self.pool.shutdown(wait=False, cancel_futures=True)


def take_rows(rows, n: int) -> list:
    """The next n items of a row stream, or fewer ending with a reader's failure (after which it has no more)."""
    items = []
    for _ in range(n):
        items.append(next(rows))
        if isinstance(items[-1], ReadFailure):
            break
    return items
