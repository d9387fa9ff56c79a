"""Share arithmetic of file sources: the files' pieces (whole files, byte ranges, parquet row groups) laid end to
end and cut into `lanes` contiguous shares of about equal weight (`split_shares`), and the training / held-out
cut at the tail (`split_tail`). Pure arithmetic on (file, lo, hi, weight): nothing here reads a file.
"""

from __future__ import annotations

import bisect
import math
from typing import List, NamedTuple, Sequence, Tuple

# a cut between shares moves to a file / row-group boundary within this fraction of a share
SNAP = 1 / 8


class Piece(NamedTuple):
    file: int  # index into FileSource.files
    lo: int  # coordinates in the file: bytes (JSON lines), rows (parquet); 0..1 for an unsplittable file
    hi: int
    weight: int  # bytes
    splittable: bool


class Segment(NamedTuple):
    file: int
    lo: int  # coordinates [lo, hi) of the file: bytes or rows; the whole file for an unsplittable one
    hi: int
    stride: int = 1  # unsplittable file shared by `stride` lanes: this lane keeps records i == rank (mod stride)
    rank: int = 0


def split_shares(pieces: Sequence[Piece], lanes: int) -> List[List[Segment]]:
    """Cut the pieces, laid end to end, into `lanes` contiguous shares of about equal weight.

    Ideal cuts are at j*W/L; a cut moves to the nearest piece boundary within SNAP of a share (whole files / row
    groups where they are small). A splittable piece is divided at the cuts (its coordinates scaled to weight);
    an unsplittable one goes to the lanes whose share's midpoint falls in it (or, if none, the lane whose share
    holds its own midpoint), which read it each and keep every k-th record."""
    total = sum(p.weight for p in pieces)
    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + p.weight)
    cuts = [j * total // lanes for j in range(lanes + 1)]
    tol = total * SNAP / lanes
    for j in range(1, lanes):
        i = bisect.bisect_left(bounds, cuts[j])
        near = min((b for b in bounds[max(0, i - 1) : i + 1]), key=lambda b: abs(b - cuts[j]))
        if abs(near - cuts[j]) <= tol:
            cuts[j] = near
        cuts[j] = max(cuts[j], cuts[j - 1])
    shares: List[List[Segment]] = [[] for _ in range(lanes)]
    mids2 = [cuts[j] + cuts[j + 1] for j in range(lanes)]  # twice each share's midpoint (integers)

    def add(j, seg):
        last = shares[j][-1] if shares[j] else None
        if last is not None and last.file == seg.file and last.hi == seg.lo and last.stride == seg.stride == 1:
            shares[j][-1] = last._replace(hi=seg.hi)
        else:
            shares[j].append(seg)

    for p, ps, pe in zip(pieces, bounds, bounds[1:]):
        if pe == ps:
            continue
        if p.splittable:
            first = max(0, bisect.bisect_right(cuts, ps) - 1)
            for j in range(first, lanes):
                a, b = max(cuts[j], ps), min(cuts[j + 1], pe)
                if cuts[j] >= pe:
                    break
                if a >= b:
                    continue
                lo = p.lo + (a - ps) * (p.hi - p.lo) // (pe - ps)
                hi = p.lo + (b - ps) * (p.hi - p.lo) // (pe - ps)
                if lo < hi:
                    add(j, Segment(p.file, lo, hi))
        else:
            group = [j for j in range(lanes) if 2 * ps <= mids2[j] < 2 * pe]
            if not group:
                group = [min(lanes - 1, max(0, bisect.bisect_right(cuts, (ps + pe) // 2) - 1))]
            for r, j in enumerate(group):
                add(j, Segment(p.file, p.lo, p.hi, len(group), r))
    return shares


def split_tail(pieces: Sequence[Piece], fraction: float) -> Tuple[List[Piece], List[Piece]]:
    """(training pieces, held-out pieces): the pieces laid end to end, cut so that the last `fraction` of their
    weight is held out. A splittable piece is cut inside (bytes: the JSON-lines readers then give each line to
    the side its first byte is on; rows: between rows); an unsplittable one goes to the side of its midpoint."""
    if not fraction:
        return list(pieces), []
    total = sum(p.weight for p in pieces)
    cut = total - math.ceil(total * fraction)
    train: List[Piece] = []
    held: List[Piece] = []
    at = 0
    for p in pieces:
        ps, pe = at, at + p.weight
        at = pe
        if pe <= cut:
            train.append(p)
        elif ps >= cut:
            held.append(p)
        elif p.splittable:
            c = p.lo + (cut - ps) * (p.hi - p.lo) // (pe - ps)
            if c > p.lo:
                train.append(p._replace(hi=c, weight=max(1, p.weight * (c - p.lo) // (p.hi - p.lo))))
            if c < p.hi:
                held.append(p._replace(lo=c, weight=max(1, p.weight * (p.hi - c) // (p.hi - p.lo))))
        else:
            (train if ps + pe <= 2 * cut else held).append(p)
    return train, held
