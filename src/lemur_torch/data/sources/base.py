"""The `Source` interface every reader implements, the seeded per-epoch order, and the held-out slice rules.

Held-out slices (`holdout`, a fraction per source; validation during training, lemur_torch/validation.py): a
part of each source that training never reads, chosen from the data alone - the same on any number of ranks,
lanes or workers, shuffled or not, in every epoch, and for every seed (so runs are comparable):
- file sources (file.py): the tail of the natural-order address space (files in path order, end to end: bytes
  of JSON lines, rows of parquet weighted by their bytes), cut with the readers' own rules - a JSON line belongs
  to the side its first byte is on, a parquet cut falls between rows, an unsplittable file (.gz, JSON array) goes
  whole to the side its midpoint is on. Training lays out and shuffles only the pieces before the cut; the
  held-out reader (`held_out()`) reads only the pieces after it, so validation reads ~ what it evaluates. The
  tail is not a random sample: where the file order means something (dates, languages), use eval.sources
  instead;
- one-document-per-file sources (indexed.py: built-in corpus, text trees, built-in conversations): the
  round(f x N) documents (at least one) whose identity - the path relative to the source's folder, or the item's
  key - hashes lowest (sha256, `holdout_rank`). A random-looking sample that costs no reads, and adding or
  removing other documents moves at most the documents at the boundary.
The fraction is part of the resume fingerprint: changing it changes what training reads.
"""

from __future__ import annotations

import hashlib
import random
from typing import Dict, Iterator, List, Optional, Tuple

from lemur_torch.data.sources.records import text_record
from lemur_torch.errors import DataConfigError


def epoch_order(n: int, seed: int, name: str, epoch: int, shuffle: bool) -> List[int]:
    """0..n-1, in a seeded permutation per (seed, name, epoch) when `shuffle`."""
    order = list(range(n))
    if shuffle:
        # string seeds hash deterministically (random.Random uses sha512 for str), unlike hash()
        random.Random(f"{seed}/{name}/{epoch}").shuffle(order)
    return order


def holdout_rank(key: str) -> bytes:
    """Where a document with identity `key` ranks for holding out (lowest first)."""
    return hashlib.sha256(b"lemur-holdout\0" + key.encode("utf-8", "surrogatepass")).digest()[:8]


class Source:
    """One configured source: a sequence of records per epoch, read lane by lane (package docstring)."""

    kind = "?"
    text_field = "text"
    holdout = 0.0  # fraction held out of training (`set_holdout`)
    holdout_setting = "data.holdout"  # the config key that fraction comes from (named in errors and logs)

    def __init__(self, name: str, domain: str, weight: float, seed: int, shuffle: bool = True):
        self.name, self.domain, self.weight, self.seed, self.shuffle = name, domain, weight, seed, shuffle

    def num_records(self) -> Optional[int]:
        """Records per epoch when known without reading (None otherwise); used to validate lanes."""
        return None

    def record(self, obj: dict):
        """The record of one JSON object or parquet row: its text field (chat sources make a conversation of it)."""
        return text_record(obj.get(self.text_field), self.text_field)

    def records(self, epoch: int, lane: int, lanes: int, pos=None) -> Iterator[Tuple[str, object, object]]:
        """(location, record, next position) of lane `lane` of `lanes` in `epoch`, from position `pos` (None: the
        start of the lane's share of that epoch)."""
        raise NotImplementedError  # pragma: no cover

    def fingerprint(self) -> Dict[str, object]:
        """What the meaning of a position depends on (the loader refuses to resume when any of it changed)."""
        fp: Dict[str, object] = {"kind": self.kind, "shuffle": self.shuffle}
        if self.holdout:  # absent when 0: states saved before held-out slices existed still resume
            fp["holdout"] = self.holdout
        return fp

    def set_holdout(self, fraction: float, setting: str) -> None:
        """Keep `fraction` of the source out of training (module docstring); `setting` names the key in errors."""
        fraction = float(fraction)
        if not 0.0 <= fraction < 1.0:
            raise DataConfigError(f"source {self.name!r}: {setting}={fraction} must be a fraction in [0, 1)")
        self.holdout, self.holdout_setting = fraction, setting
        self.split_holdout(fraction, setting)

    def split_holdout(self, fraction: float, setting: str) -> None:
        """Lay out what training reads and what is held out, for a checked `fraction` (0: nothing held out)."""
        raise NotImplementedError  # pragma: no cover

    def held_out(self, whole: bool = False) -> "Source":
        """A source that reads only the held-out slice (all of the source with `whole`), in natural order and
        unshuffled, split into lanes by the same rules as training; its epoch 0 is the slice once."""
        raise NotImplementedError  # pragma: no cover

    def lane_weights(self, lanes: int) -> List[float]:
        """How much data (bytes or characters) each lane's share of epoch 0 holds."""
        raise NotImplementedError  # pragma: no cover

    def held_out_summary(self) -> str:
        """What `set_holdout` kept out, for the start-up log."""
        raise NotImplementedError  # pragma: no cover

    def check_lanes(self, lanes: int) -> None:
        n = self.num_records()
        if n is not None and n < lanes:
            raise DataConfigError(
                f"source {self.name!r} has {n} records, fewer than data.lanes={lanes}: every lane needs "
                "documents; lower data.lanes"
            )

    def describe(self, lanes: int) -> Tuple[str, float]:
        """One line for the start-up log, and the expected read amplification (bytes read / bytes of the data)."""
        raise NotImplementedError  # pragma: no cover
