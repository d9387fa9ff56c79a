"""Validation rows of held-out slices: each lane's share of a held-out reader (`Source.held_out()`) packed once
by the loader's own packer, from its start, into at most a given number of rows.

`rank_rows` builds the rows a data-parallel rank owns (lanes v = rank (mod ranks) of every source), so every
lane is read by one rank; `apportion` shares a number of rows among the lanes in proportion to their data. A lane
that runs out pads its last row (no loss on the padding) and gives what it has. Reads are sized to about a row's
text (`narrow_reads`, and the packer's read_chars), so the bytes read are ~ what is evaluated. What is evaluated,
when, and the metrics: lemur_torch/validation.py.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.data.packing import BadCounter, Refiller
from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.readers import READ_BLOCK, TAIL_BLOCK
from lemur_torch.data.sources.records import Bad

END = -1  # token id of the end marker a one-pass packer emits after its share (never a real token)
BYTES_PER_TOKEN = 4  # about Llama's tokenizer on English (code ~3.5): sizes the validation reads to a row's text


def narrow_reads(sources: Sequence[Source], seq_len: int) -> None:
    """Ranged reads of about a row's text, not training's 1 MB, for these (held-out) readers."""
    for src in sources:
        if hasattr(src, "read_block"):
            src.read_block = min(READ_BLOCK, max(TAIL_BLOCK, BYTES_PER_TOKEN * seq_len))


def rank_rows(loader, sources: Sequence[Source], quotas: Sequence[Sequence[int]], rank: int, ranks: int):
    """The validation rows data-parallel rank `rank` of `ranks` builds: lanes v = rank (mod ranks) of every source,
    quotas[s][v] rows from lane v of source s. Returns (rows, their source indices, rows per source, bytes read
    per source)."""
    tokenize = loader.make_tokenize()(loader.tokenizer)
    bad = BadCounter(loader.strict, loader.log_bad)
    rows: List[np.ndarray] = []
    ids: List[int] = []
    built, read = [0] * len(sources), [0] * len(sources)
    for s, (src, quota) in enumerate(zip(sources, quotas)):
        for v in range(rank, loader.lanes, ranks):
            if quota[v]:
                got, nbytes = lane_rows(loader, src, v, loader.lanes, tokenize, bad, quota[v])
                rows += got
                ids += [s] * len(got)
                built[s] += len(got)
                read[s] += nbytes
    return rows, ids, built, read


def lane_rows(
    loader, src: Source, lane: int, lanes: int, tokenize, bad: BadCounter, n: int
) -> Tuple[List[np.ndarray], int]:
    """Up to n rows [3, S] (input_ids, labels, position_ids) from one pass over `src`'s share of `lane`, made by
    the loader's packer, and the bytes read for them."""
    S = loader.seq_len
    read_chars = min(loader.read_chars, max(1024, BYTES_PER_TOKEN * S))  # a row's text per read: little read-ahead
    cls = type(f"OnePass{loader.packer_cls.__name__}", (OnePass, loader.packer_cls), {})
    packer = cls(src, lane, lanes, S, tokenize, bad, read_chars, None, Refiller(tokenize))
    rows = []
    while len(rows) < n:
        ids, labels, pos = packer.next_row(loader.attend_across_documents)
        if ids[0] == END:
            break
        end = ids == END
        ids[end], labels[end] = 0, IGNORE_INDEX  # the padding after the last document of the share
        rows.append(np.stack([ids, labels, pos]).astype(np.int64))
    return rows, packer.io["bytes"]


class OnePass:
    """Mixin over a loader's packer class: epoch 0 of the source's lane share once, then end markers (a pretraining
    row is padded after the last document; a chat row ends before the marker, which it cannot fit)."""

    _ended = False

    def _records(self):
        for loc, rec, nxt in self.source.records(0, self.lane, self.lanes, None):
            if not isinstance(rec, (str, Bad)):
                rec.loc = loc  # a conversation dropped after encoding is reported at its source line
            yield 0, nxt, loc, rec

    def _refill(self) -> None:
        if not self._ended:
            super()._refill()
            if self._queue:
                return
            self._ended = True
        S = self.seq_len
        marker = np.full(S, END, dtype=np.int32)
        if getattr(self, "pack", None) is not None:  # chat packers queue [2, n] (input_ids, labels) items
            marker = np.stack([marker, np.full(S, IGNORE_INDEX, dtype=np.int32)])
        self._queue.append((1, None, marker))


def apportion(total: int, weights: Sequence[float]) -> List[int]:
    """Integers summing to `total` in proportion to `weights` (largest remainders; ties to the lower index)."""
    w = sum(weights)
    if w <= 0:
        return [0] * len(weights)
    exact = [total * x / w for x in weights]
    out = [int(math.floor(x)) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
        out[i] += 1
    return out
