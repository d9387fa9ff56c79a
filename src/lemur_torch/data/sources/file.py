"""File sources (kinds jsonl, parquet, hf): JSON lines (plain or .gz), JSON array files and parquet, local or
remote, laid out in shares of bytes or rows.

The files are listed once, with their sizes (and, for parquet, the row groups from each footer) - on rank 0,
then shared by the loader - and never scanned at start (listing.py). Each epoch lays the files end to end (in a
seeded order per epoch when `shuffle`) and cuts that address space into `lanes` contiguous shares of equal bytes
(shares.py); a cut moves to a file or row-group boundary within 1/8 of a share, so lanes read whole files or row
groups where those are small. So a lane reads only its share, with the reader of each file's format
(readers.py). `.gz` files and JSON array files cannot be split: one goes whole to the lanes whose shares'
midpoints fall in it, which read it each and keep every k-th record; the start-up log says what that costs
(`describe`).

Per-epoch order: with `shuffle` the file order and the assignment of shares to lanes are seeded permutations per
epoch (reads stay sequential inside a share); `shuffle: false` keeps the natural order and lane l reads the l-th
share. The held-out slice is the tail of the natural order (base.py, "Held-out slices").
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

from lemur_torch.data.sources.base import Source, epoch_order
from lemur_torch.data.sources.listing import GZ, JSON_ARRAY, JSONL, PARQUET, FileInfo, Listing, files_digest
from lemur_torch.data.sources.readers import READ_BLOCK, READERS
from lemur_torch.data.sources.shares import Piece, Segment, split_shares, split_tail
from lemur_torch.data.storage import Storage
from lemur_torch.errors import DataConfigError, DataReadError


class FileSource(Source):
    """JSON lines (plain or .gz), JSON array files and parquet, local or remote (kinds jsonl, parquet, hf)."""

    def __init__(
        self,
        name,
        domain,
        weight,
        seed,
        shuffle,
        kind: str,
        listing: Listing,
        text_field: str = "text",
        storage: Optional[Storage] = None,
        identity: Optional[Dict[str, object]] = None,
    ):
        super().__init__(name, domain, weight, seed, shuffle)
        self.kind, self.text_field = kind, text_field
        self.files: List[FileInfo] = list(listing.files)
        self.storage = storage or Storage()
        self.identity = dict(identity or {})
        self._shares: Dict[Tuple[int, int], List[List[Segment]]] = {}
        # with a held-out slice: the training pieces of each file and the held-out pieces (set_holdout)
        self._train_pieces: Optional[Dict[int, List[Piece]]] = None
        self._held_pieces: List[Piece] = []
        self._view: Optional[str] = None  # "held" or "whole" for a held_out() reader
        # bytes per ranged read of a JSON-lines share; a validation reader that needs little of its share reads less
        self.read_block = READ_BLOCK

    # -- layout ----------------------------------------------------------------------------------------
    def _file_pieces(self, fi: int) -> List[Piece]:
        f = self.files[fi]
        if f.fmt == PARQUET:
            out, row = [], 0
            for rows, nbytes in f.groups:
                if rows:
                    out.append(Piece(fi, row, row + rows, max(1, nbytes), True))
                row += rows
            return out
        return [Piece(fi, 0, f.size, f.size, f.fmt == JSONL)] if f.size else []

    def _natural_pieces(self) -> List[Piece]:
        return [p for fi in range(len(self.files)) for p in self._file_pieces(fi)]

    def pieces(self, epoch: int) -> List[Piece]:
        if self._view == "held":
            return list(self._held_pieces)
        if self._view == "whole":
            return self._natural_pieces()
        order = epoch_order(len(self.files), self.seed, self.name, epoch, self.shuffle)
        if self._train_pieces is None:
            return [p for fi in order for p in self._file_pieces(fi)]
        return [p for fi in order for p in self._train_pieces.get(fi, ())]

    def split_holdout(self, fraction: float, setting: str) -> None:
        self._shares = {}
        self._train_pieces, self._held_pieces = None, []
        if not fraction:
            return
        natural = self._natural_pieces()
        train, held = split_tail(natural, fraction)
        total = sum(f.size for f in self.files)
        whole = (
            "; a .gz or JSON-array file cannot be cut and goes whole to the side its midpoint is on: convert it to "
            "JSON lines"
            if any(f.fmt in (GZ, JSON_ARRAY) for f in self.files)
            else ""
        )
        if not held:
            raise DataConfigError(
                f"source {self.name!r}: {setting}={fraction} holds out nothing of its {len(self.files)} "
                f"file(s) ({_human(total)}): raise it{whole}"
            )
        if not train:
            raise DataConfigError(
                f"source {self.name!r}: {setting}={fraction} holds out all of its {len(self.files)} "
                f"file(s) ({_human(total)}), leaving nothing to train on: lower it{whole}"
            )
        self._train_pieces = {}
        for p in train:
            self._train_pieces.setdefault(p.file, []).append(p)
        self._held_pieces = held

    def held_out(self, whole: bool = False) -> "FileSource":
        view = copy.copy(self)
        view._view, view.shuffle, view._shares = ("whole" if whole else "held"), False, {}
        return view

    def held_out_summary(self) -> str:
        held = sum(p.weight for p in self._held_pieces)
        total = sum(p.weight for p in self._natural_pieces())
        files = sorted({p.file for p in self._held_pieces})
        where = self.files[files[0]].path + (f" and {len(files) - 1} later file(s)" if len(files) > 1 else "")
        return f"{_human(held)} of {_human(total)} ({100 * held / max(1, total):.2f}%) from {where} on"

    def lane_weights(self, lanes: int) -> List[float]:
        return [sum(self._segment_read_bytes(seg) / seg.stride for seg in share) for share in self.shares(0, lanes)]

    def shares(self, epoch: int, lanes: int) -> List[List[Segment]]:
        key = (epoch, lanes)
        if key not in self._shares:
            shares = split_shares(self.pieces(epoch), lanes)
            order = epoch_order(lanes, self.seed, self.name + "/lanes", epoch, self.shuffle)
            if len(self._shares) >= 2:  # a packer moves to the next epoch while its neighbours finish theirs
                self._shares.pop(next(iter(self._shares)))
            self._shares[key] = [shares[order[lane]] for lane in range(lanes)]
        return self._shares[key]

    def num_records(self):
        if self.files and all(f.fmt == PARQUET for f in self.files):
            return sum(p.hi - p.lo for p in self.pieces(0))
        return None

    def check_lanes(self, lanes: int) -> None:
        super().check_lanes(lanes)
        empty = [lane for lane, share in enumerate(self.shares(0, lanes)) if not share]
        if empty:
            total = sum(f.size for f in self.files)
            raise DataConfigError(
                f"source {self.name!r}: {len(self.files)} file(s) of {total} bytes leave {len(empty)} of "
                f"data.lanes={lanes} lanes "
                "without data; lower data.lanes"
            )

    def fingerprint(self):
        return {
            **super().fingerprint(),
            **self.identity,
            "text_field": self.text_field,
            "files": files_digest([(f.path, f.size) for f in self.files]),
        }

    def describe(self, lanes: int) -> Tuple[str, float]:
        shares = self.shares(0, lanes)
        total = sum(f.size for f in self.files)
        read = 0.0
        for share in shares:
            for seg in share:
                read += self._segment_read_bytes(seg)
        amp = read / max(1, sum(p.weight for p in self.pieces(0)))
        nfiles = len(self.files)
        per = f"{lanes / nfiles:.1f} lanes per file" if lanes >= nfiles else f"{nfiles / lanes:.1f} files per lane"
        fmts = ", ".join(sorted({f.fmt for f in self.files}))
        line = (
            f"source {self.name!r} ({self.kind}, {fmts}): {nfiles} files, {_human(total)}; {per}; "
            f"expected read amplification {amp:.2f}x"
        )
        if self.holdout:
            line += f"; held out of training: {self.held_out_summary()}"
        unsplit = [f for f in self.files if f.fmt in (GZ, JSON_ARRAY)]
        if amp > 1.5 and unsplit:
            line += (
                f" ({len(unsplit)} {'.gz' if unsplit[0].fmt == GZ else 'JSON array'} file(s) cannot be split and are "
                "read whole by every lane that shares one: decompress them to JSON lines, or split them into >= "
                f"{lanes} files)"
            )
        return line, amp

    def _segment_read_bytes(self, seg: Segment) -> float:
        f = self.files[seg.file]
        if f.fmt == PARQUET:
            out, row = 0.0, 0
            for rows, nbytes in f.groups:
                a, b = max(seg.lo, row), min(seg.hi, row + rows)
                if a < b:
                    out += nbytes * (b - a) / rows
                row += rows
            return out
        if f.fmt == JSONL:
            return seg.hi - seg.lo
        return f.size  # an unsplittable file is read whole by each lane that shares it

    # -- reading ---------------------------------------------------------------------------------------
    def records(self, epoch, lane, lanes, pos=None):
        """A position is (segment of the lane's share, reader offset in it, line number or 0)."""
        share = self.shares(epoch, lanes)[lane]
        first, cur, line = pos if pos is not None else (0, None, 0)
        for si in range(first, len(share)):
            seg = share[si]
            f = self.files[seg.file]
            start = (cur, line) if si == first else (None, 0)
            try:
                for loc, rec, ncur, nline in READERS[f.fmt](self, f, seg, *start):
                    yield loc, rec, (si, ncur, nline)
            except DataReadError as exc:
                raise DataReadError(f"source {self.name!r}: {exc}") from None

    def columns(self) -> Optional[List[str]]:
        """The parquet columns a record is made of."""
        return [self.text_field]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
