"""Tokenize documents in batches and pack them into rows of exactly `seq_len` tokens.

A `Packer` owns one (lane, source) pair: it reads that lane's records of the source (data/sources/), has them
tokenized with the fast tokenizer's batch call (encode.py `Tokenize`: `encode_batch_fast`, no offsets; the
reader's `Refiller` puts many packers' chunks into one call), wraps each document as BOS + tokens + EOS, and
cuts the concatenation into rows. Row rules (the batch contract, lemur_torch/batch.py):
- every row holds exactly `seq_len` real tokens: no padding ever (documents longer than a row continue into
  the next row of the same packer);
- `labels` = `input_ids`, except -100 on each document's first token (its BOS), so nothing learns to predict
  a document start from the previous document; labels are unshifted (the trainer shifts);
- `position_ids` restart at 0 at each document start. A document continued from the previous row restarts at
  0 at the row start too: positions stay below seq_len (Llama-2 never saw RoPE positions >= 4096), and HF's
  packed-sequence detection (a new segment wherever position_ids do not step by +1) sees the continuation as a
  segment at column 0, never as a fresh document in mid-row;
- with `attend_across_documents` (the original Lemur/EasyLM behaviour) position_ids are 0..seq_len-1 in every
  row, so documents in a row attend to each other; labels are the same.

A packer's position, `Packer.state()`, is (epoch, the reader position `pos` of the first unfinished record in
this lane's share of the epoch - a byte offset, row or index the reader seeks to, see data/sources/ - and tokens of
it already emitted) plus counters (skipped records, bytes read, retried reads): re-reading from there reproduces
the rest of the stream exactly, because a document's tokens do not depend on which batch it was tokenized in.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Future
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np

from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.data.encode import Tokenize
from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.records import Bad
from lemur_torch.data.storage import io_counters
from lemur_torch.errors import BadInputError

log = logging.getLogger("lemur_torch.data")


class BadCounter:
    """Skips (or, strict, raises on) bad records; logs the first few of each source in full, then counts."""

    def __init__(self, strict: bool, log_first: int):
        self.strict, self.log_first = strict, log_first
        self.logged: Dict[str, int] = {}

    def report(self, source: Source, loc: str, bad: Bad) -> None:
        if self.strict:
            raise BadInputError(f"{loc}: {bad.detail or bad.reason} (source {source.name!r}, data.strict=true)")
        n = self.logged.get(source.name, 0) + 1
        self.logged[source.name] = n
        if n <= self.log_first:
            log.warning(
                "skipped bad record at %s: %s (source %r, %s)", loc, bad.detail or bad.reason, source.name, bad.reason
            )
        elif n & (n - 1) == 0:  # powers of two: the count keeps showing up without flooding the log
            log.warning("source %r: %d bad records skipped by this reader so far (see loader.stats())", source.name, n)


class Refiller:
    """Reads and tokenizes packers' next chunks ahead of need, many packers per tokenizer call.

    Rows visit a reader's lanes in turn, so its packers run dry at about the same rate: when a packer takes a
    chunk it asks for the next one, and requests gather until they hold `batch_chars` of text (or half of what
    all its packers read per chunk, if less), then go out as one read, which tokenizes all their texts in one
    batch call (the batch the fast tokenizer spreads over cores); no packer holds more than one chunk ahead. So
    the chunks can stay small (little read-ahead, little tokenized and unused when a run stops) while the
    tokenizer's batches stay big. A packer that needs its chunk now never waits for a batch to fill.
    With a thread pool, reads run in its threads (the tokenizer releases the GIL) while rows are packed, up to
    `depth` at once: a read's longest document keeps a single core busy to the end of its call and the ids'
    conversion to arrays runs on one core, and a second read keeps the other cores tokenizing meanwhile.
    Without a pool a read runs inline when a packer needs it. Each packer is in at most one read at a time, so
    its reader advances in order; its records do not depend on who else was read, or when.
    """

    def __init__(self, tokenize: Tokenize, pool=None, depth: int = 2, batch_chars: int = 1 << 18):
        self.tokenize, self.pool, self.batch_chars = tokenize, pool, batch_chars
        self.depth = depth if pool is not None else 1
        self.wanting: List["Packer"] = []  # asked for a chunk, not yet in a read
        self.reads: Deque[tuple] = deque()  # reads in flight, oldest first: (future, members)
        self.known: set = set()  # packers seen, and the characters they read per chunk
        self.known_chars = 0

    def take(self, packer: "Packer"):
        """The packer's next chunk (waiting for it if needed); asks for the one after it."""
        while packer.ready is None:
            if packer.inflight or len(self.reads) >= self.depth:
                self._harvest(self.reads[0])  # its own read is at most this old; or make room for it
                continue
            if packer not in self.wanting:
                self.wanting.append(packer)
            self._launch()
        chunk, packer.ready = packer.ready, None
        self.wanting.append(packer)
        if packer not in self.known:
            self.known.add(packer)
            self.known_chars += packer.read_chars
        if self.pool is not None:  # read ahead in the background, in batches
            for read in [r for r in self.reads if r[0].done()]:
                self._harvest(read)
            batch = min(self.batch_chars, self.known_chars // 2)
            if len(self.reads) < self.depth and sum(p.read_chars for p in self.wanting) >= batch:
                self._launch()
        return chunk

    def _launch(self) -> None:
        members, self.wanting = self.wanting, []
        for p in members:
            p.inflight = True
        if self.pool is None:
            future = Future()
            try:
                future.set_result(self._read(members))
            except BaseException as exc:  # noqa: BLE001 - re-raised by _harvest, as a thread's would be
                future.set_exception(exc)
        else:
            future = self.pool.submit(self._read, members)
        self.reads.append((future, members))

    def _harvest(self, read) -> None:
        self.reads.remove(read)
        future, members = read
        for p in members:
            p.inflight = False
        for p, ready in future.result().items():
            p.ready = ready

    def _read(self, members: List["Packer"]):
        parts = [p.read_chunk() for p in members]
        texts = [t for _, ts, _, _, _ in parts for t in ts]
        docs = iter(self.tokenize.documents(texts))
        out = {}
        for p, (chunk, _, keys, nxt, io) in zip(members, parts):
            for i in keys:
                chunk[i] = (chunk[i][0], chunk[i][1], next(docs))
            out[p] = (chunk, nxt, io)
        return out


class Packer:
    """Rows of one source's share of one lane: that lane's records of each epoch in turn (data/sources/)."""

    def __init__(
        self,
        source: Source,
        lane: int,
        lanes: int,
        seq_len: int,
        tokenize: Tokenize,
        bad: BadCounter,
        read_chars: int,
        state: Optional[dict] = None,
        refiller: Optional[Refiller] = None,
    ):
        self.source, self.lane, self.lanes, self.seq_len = source, lane, lanes, seq_len
        self.tokenize, self.bad, self.read_chars = tokenize, bad, read_chars
        # the reader's shared Refiller (it batches many packers' reads into one tokenizer call); alone: inline
        self.refiller = refiller if refiller is not None else Refiller(tokenize)
        st = state or {}
        self.epoch: int = st.get("epoch", 0)
        self.pos = st.get("pos")  # reader position of the first unfinished record (None: start of the epoch's share)
        self.offset: int = st.get("offset", 0)  # tokens of that record already emitted
        self.docs: int = st.get("docs", 0)  # documents started
        self.skipped: Dict[str, int] = dict(st.get("skipped", {}))
        self.io: Dict[str, int] = dict(st.get("io", {"bytes": 0, "retries": 0}))  # bytes read, retried reads
        # read-ahead queue of (epoch, pos, tokens or Bad); head = record (self.epoch, self.pos)
        self._queue: Deque[Tuple[int, object, object]] = deque()
        self._read_epoch, self._read_pos = self.epoch, self.pos
        self._reader = None
        self._next = (self.epoch, self.pos)  # reader position after the queued records
        # refill bookkeeping, owned by the Refiller: a chunk read ahead, and whether a read is in flight
        self.ready: Optional[tuple] = None
        self.inflight = False

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "offset": self.offset,
            "docs": self.docs,
            "skipped": dict(self.skipped),
            "io": dict(self.io),
        }

    def _records(self):
        while True:
            epoch, first, good = self._read_epoch, self._read_pos is None, 0
            for loc, rec, nxt in self.source.records(epoch, self.lane, self.lanes, self._read_pos):
                good += not isinstance(rec, Bad)
                here, self._read_pos = self._read_pos, nxt  # before yielding: current while the consumer runs
                yield epoch, here, loc, rec
            if first and good == 0:
                raise BadInputError(
                    f"source {self.source.name!r}: lane {self.lane} of {self.lanes} found no usable document in "
                    "a whole "
                    "epoch (the source has too little data, or too few good records, for data.lanes); lower "
                    "data.lanes "
                    f"or fix the source"
                )
            self._read_epoch, self._read_pos = epoch + 1, None

    def read_chunk(self):
        """Read about read_chars of text (Refiller thread or inline): records with tokens still to fill in, the
        texts, their places in the chunk, the reader position after the chunk, and the reads it cost."""
        if self._reader is None:
            self._reader = self._records()
        bytes0, retries0 = io_counters()
        chunk, texts, keys, chars = [], [], [], 0
        while chars < self.read_chars:
            try:
                epoch, pos, loc, rec = next(self._reader)
            except StopIteration:  # a finite reader (validation: one pass over a held-out slice) has ended
                break
            if isinstance(rec, Bad):
                rec.loc = loc  # reported (or raised, strict) when packing reaches it, in stream order
                chunk.append((epoch, pos, rec))
                continue
            texts.append(rec)
            keys.append(len(chunk))
            chunk.append((epoch, pos, None))
            chars += len(rec)
        bytes1, retries1 = io_counters()
        return chunk, texts, keys, (self._read_epoch, self._read_pos), (bytes1 - bytes0, retries1 - retries0)

    def _refill(self) -> None:
        chunk, self._next, (nbytes, retries) = self.refiller.take(self)
        self.io["bytes"] += nbytes
        self.io["retries"] += retries
        self._queue.extend(chunk)

    def next_row(self, attend_across_documents: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, labels, position_ids), each int64 [seq_len]."""
        S = self.seq_len
        ids = np.empty(S, dtype=np.int64)
        pos = np.empty(S, dtype=np.int64)
        starts: List[int] = []
        filled = 0
        while filled < S:
            if not self._queue:
                self._refill()
            epoch, _, toks = self._queue[0]
            if isinstance(toks, Bad):
                self.bad.report(self.source, toks.loc, toks)
                self.skipped[toks.reason] = self.skipped.get(toks.reason, 0) + 1
                self._advance()
                continue
            if self.offset == 0:
                starts.append(filled)
                self.docs += 1
            take = min(S - filled, len(toks) - self.offset)
            ids[filled : filled + take] = toks[self.offset : self.offset + take]
            pos[filled : filled + take] = np.arange(take)
            filled += take
            self.offset += take
            if self.offset == len(toks):
                self._advance()
        labels = ids.copy()
        labels[starts] = IGNORE_INDEX
        if attend_across_documents:
            pos = np.arange(S, dtype=np.int64)
        return ids, labels, pos

    def _advance(self) -> None:
        self._queue.popleft()
        self.offset = 0
        if self._queue:
            self.epoch, self.pos = self._queue[0][0], self._queue[0][1]
        else:
            self.epoch, self.pos = self._next
