"""Token-ratio mixing: which source global row g comes from, as a pure function of g.

Every packed row holds exactly seq_len tokens of one source (the Megatron-LM "blended dataset" design), so a
ratio of rows *is* the ratio of tokens, and the mixture is decided without tokenizing anything. Weights become
small integers w_s (exact rationals scaled by their common denominator); one period of P = sum(w_s) rows holds
exactly w_s rows of source s, ordered by the deficit rule (the next row goes to the source furthest below its
target share), so every prefix of the pattern is within one row of the target.

Lanes (loader.py) take rows g = lane (mod L). With pattern[g mod P], lane l would only ever see the pattern
positions l (mod gcd(L, P)): with weights 2:1 and 12 lanes, a lane would read only one source, and the other
lanes' share of that source's documents would never be read. So the pattern is rotated by one position per
super-block of K = lcm(L, P) rows: row g has pattern position (g + g // K) mod P. Every lane then cycles through
all positions (exact proportions over every gcd(L, P) super-blocks), each super-block holds exactly K*w_s/P rows
of s, and every prefix of the global stream is within two rows of its target. Resume and world-size changes are
arithmetic, not replay.
"""

from __future__ import annotations

from fractions import Fraction
from functools import reduce
from math import gcd
from typing import Dict, List, Sequence

import numpy as np

from lemur_torch.errors import DataConfigError

MAX_PERIOD = 1 << 20


def integer_weights(weights: Sequence[float]) -> List[int]:
    """Smallest integers in the same ratio as `weights` (each read as a decimal fraction, e.g. 0.4 = 2/5)."""
    fracs = [Fraction(str(float(w))).limit_denominator(10_000) for w in weights]
    lcm = reduce(lambda a, b: a * b // gcd(a, b), (f.denominator for f in fracs), 1)
    ints = [int(f * lcm) for f in fracs]
    g = reduce(gcd, ints)
    return [i // g for i in ints]


class Schedule:
    def __init__(self, names: Sequence[str], weights: Sequence[float], lanes: int = 1):
        for n, w in zip(names, weights):
            if not float(w) > 0:
                raise DataConfigError(f"source {n!r}: weight must be positive, got {w}")
        self.names = list(names)
        self.weights = integer_weights(weights)
        self.period = sum(self.weights)
        if self.period > MAX_PERIOD:
            raise DataConfigError(
                f"data.sources weights {list(weights)} need a mixing period of {self.period} rows; use weights "
                "with fewer decimals"
            )
        w = np.array(self.weights, dtype=np.int64)
        count = np.zeros(len(w), dtype=np.int64)
        pattern = np.empty(self.period, dtype=np.int32)
        for g in range(self.period):
            # deficit after this row if nobody took it: target (g+1) * w/P minus realised; compare scaled by P
            s = int(np.argmax(w * (g + 1) - count * self.period))
            pattern[g] = s
            count[s] += 1
        assert (count == w).all()
        self.pattern = pattern
        self.superblock = self.period * lanes // gcd(self.period, lanes)
        # prefix counts over two periods, so any cyclic window of up to P positions is one subtraction
        twice = np.concatenate([pattern, pattern])
        self._prefix = np.zeros((2 * self.period + 1, len(w)), dtype=np.int64)
        np.add.at(self._prefix[1:], (np.arange(2 * self.period), twice), 1)
        self._prefix = np.cumsum(self._prefix, axis=0)

    def source_at(self, g: int) -> int:
        return int(self.pattern[(g + g // self.superblock) % self.period])

    def rows_before(self, g: int) -> List[int]:
        """Rows of each source among global rows 0..g-1 (O(1))."""
        blocks, r = divmod(g, self.superblock)
        per_block = self.superblock // self.period
        rot = blocks % self.period
        q, t = divmod(r, self.period)
        window = self._prefix[rot + t] - self._prefix[rot]
        return [int((blocks * per_block + q) * w + c) for w, c in zip(self.weights, window)]

    def fractions(self, g: int) -> Dict[str, float]:
        rows = self.rows_before(g)
        return {n: (c / g if g else 0.0) for n, c in zip(self.names, rows)}
