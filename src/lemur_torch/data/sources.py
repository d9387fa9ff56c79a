"""Document readers: what a document is, where it lives, and which part of it each lane reads.

A source is a sequence of *records* per epoch (a JSON line, a parquet row, a file, an HF example), each with a
location used in bad-input reports (`file:line`, `file (byte N)` where a share starts mid-file, `file#row`). A
record is either a document's text or a `Bad` (malformed JSON, missing text field, empty text, undecodable
bytes).

`Source.records(epoch, lane, lanes, pos)` yields `(location, record, next_pos)` for lane `lane` of `lanes`,
from position `pos` (None: the start of the lane's share of that epoch). A position is a few integers that the
reader seeks to: resuming at 90% of a corpus costs what resuming at 0% costs.

File sources (kinds jsonl, parquet, hf: `FileSource`): the files are listed once, with their sizes (and, for
parquet, the row groups from each footer) - on rank 0, then shared (loader.py) - and never scanned at start.
Each epoch lays the files end to end (in a seeded order per epoch when `shuffle`) and cuts that address space
into `lanes` contiguous shares of equal bytes (`split_shares`); a cut moves to a file or row-group boundary
within 1/8 of a share, so lanes read whole files or row groups where those are small. So a lane reads only its
share:
- uncompressed JSON lines: a byte range; a line belongs to the range it starts in (as Hadoop/Spark input
  splits): a reader starting mid-file skips to the first line start at or after the cut, and reads past its end
  only to finish its last line;
- parquet: row ranges, by row group; inside a row group shared by lanes only the data pages that hold the
  lane's rows are read (parquet_pages.py);
- `.gz` files and JSON array files cannot be split: one goes whole to the lanes whose shares' midpoints fall in
  it, which read it each and keep every k-th record; the start-up log says what that costs (`describe`).
Per-epoch order: with `shuffle` the file order and the assignment of shares to lanes are seeded permutations
per epoch (reads stay sequential inside a share); `shuffle: false` keeps the natural order and lane l reads the
l-th share. One-document-per-file sources (built-in corpus, text trees) are index-addressed instead: lane l
reads documents l, l+L, ... of a seeded per-epoch permutation, each opened alone, so nothing is read twice.

Held-out slices (`holdout`, a fraction per source; validation during training, lemur_torch/validation.py): a
part of each source that training never reads, chosen from the data alone - the same on any number of ranks,
lanes or workers, shuffled or not, in every epoch, and for every seed (so runs are comparable):
- file sources: the tail of the natural-order address space (files in path order, end to end: bytes of JSON
  lines, rows of parquet weighted by their bytes), cut with the readers' own rules - a JSON line belongs to the
  side its first byte is on, a parquet cut falls between rows, an unsplittable file (.gz, JSON array) goes whole
  to the side its midpoint is on. Training lays out and shuffles only the pieces before the cut; the held-out
  reader (`held_out()`) reads only the pieces after it, so validation reads ~ what it evaluates. The tail is not
  a random sample: where the file order means something (dates, languages), use eval.sources instead;
- one-document-per-file sources (built-in corpus, text trees, built-in conversations): the round(f x N)
  documents (at least one) whose identity - the path relative to the source's folder, or the item's key -
  hashes lowest (sha256). A random-looking sample that costs no reads, and adding or removing other documents
  moves at most the documents at the boundary.
The fraction is part of the resume fingerprint: changing it changes what training reads.
"""

from __future__ import annotations

import bisect
import copy
import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from lemur_torch.data.storage import Storage, fs_and_path, is_url
from lemur_torch.errors import DataConfigError, DataReadError

log = logging.getLogger("lemur_torch.data")

# reasons a record is skipped (keys of the per-source skip counters)
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
EMPTY = "empty"
UNDECODABLE = "undecodable"
REASONS = (MALFORMED_JSON, MISSING_FIELD, EMPTY, UNDECODABLE)

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# bytes per ranged read of a JSON-lines share: big enough that a request's latency is amortised, small enough
# that a share's last read overshoots little; past the share's end, reads are short (only the last line remains)
READ_BLOCK = 1 << 20
TAIL_BLOCK = 1 << 12
# a cut between shares moves to a file / row-group boundary within this fraction of a share
SNAP = 1 / 8

__all__ = [
    "Bad",
    "Source",
    "FileSource",
    "build_source",
    "resolve_listing",
    "split_shares",
    "holdout_fraction",
]


@dataclass
class Bad:
    reason: str
    detail: str = ""
    loc: str = ""


Record = Tuple[str, Union[str, Bad]]  # (location, text or Bad)


def _check_text(value, text_field: str) -> Union[str, Bad]:
    if value is None:
        return Bad(MISSING_FIELD, f"no field {text_field!r}")
    if not isinstance(value, str):
        return Bad(MISSING_FIELD, f"field {text_field!r} is {type(value).__name__}, not a string")
    if not value.strip():
        return Bad(EMPTY, "empty document")
    return value


def _epoch_order(n: int, seed: int, name: str, epoch: int, shuffle: bool) -> List[int]:
    order = list(range(n))
    if shuffle:
        # string seeds hash deterministically (random.Random uses sha512 for str), unlike hash()
        random.Random(f"{seed}/{name}/{epoch}").shuffle(order)
    return order


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


class Source:
    """One configured source. Subclasses implement `records` (see the module docstring)."""

    kind = "?"
    text_field = "text"
    holdout = 0.0  # fraction held out of training (`set_holdout`)

    def __init__(self, name: str, domain: str, weight: float, seed: int, shuffle: bool = True):
        self.name, self.domain, self.weight, self.seed, self.shuffle = name, domain, weight, seed, shuffle

    def num_records(self) -> Optional[int]:
        """Records per epoch when known without reading (None otherwise); used to validate lanes."""
        return None

    def record(self, obj: dict):
        """The record of one JSON object or parquet row: its text field (chat sources make a conversation of it)."""
        return _check_text(obj.get(self.text_field), self.text_field)

    def records(self, epoch: int, lane: int, lanes: int, pos=None) -> Iterator[Tuple[str, object, object]]:
        raise NotImplementedError  # pragma: no cover

    def fingerprint(self) -> Dict[str, object]:
        """What the meaning of a position depends on (loader.py refuses to resume when any of it changed)."""
        fp: Dict[str, object] = {"kind": self.kind, "shuffle": self.shuffle}
        if self.holdout:  # absent when 0: states saved before held-out slices existed still resume
            fp["holdout"] = self.holdout
        return fp

    def set_holdout(self, fraction: float, setting: str) -> None:
        """Keep `fraction` of the source out of training (module docstring); `setting` names the key in errors."""
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
        n = self.num_records()
        held = f" ({len(self._held)} held out of training, chosen by a hash of their names)" if self._held else ""
        return (
            f"source {self.name!r} ({self.kind}): {len(self)} documents{held}, {n / lanes:.1f} per lane, each "
            "read once",
            1.0,
        )


class IndexedSource(Source):
    """Random-access records (one document per file or item): lane l reads items l, l+L, ... of a seeded
    per-epoch permutation of the training documents; the position is the index k in that share."""

    _held: Tuple[int, ...] = ()  # held-out documents, ascending
    _train: Optional[List[int]] = None  # the other documents, ascending; None: all

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_records(self):
        return len(self.training_docs())

    def item(self, i: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    def doc_key(self, i: int) -> str:
        """Document i's identity, independent of the machine and of the other documents (picks held-out ones)."""
        return str(i)

    def doc_weight(self, i: int) -> int:
        """Document i's size (bytes or characters), known without reading it."""
        return 1

    def training_docs(self) -> Sequence[int]:
        return range(len(self)) if self._train is None else self._train

    def set_holdout(self, fraction: float, setting: str) -> None:
        self.holdout = _check_fraction(self.name, fraction, setting)
        self._held, self._train = (), None
        if not fraction:
            return
        n = len(self)
        k = max(1, round(fraction * n))
        if k >= n:
            raise DataConfigError(
                f"source {self.name!r}: {setting}={fraction} holds out {k} of its {n} documents, leaving "
                "none to train on; lower it"
            )
        ranked = sorted(range(n), key=lambda i: (_holdout_rank(self.doc_key(i)), i))
        self._held = tuple(sorted(ranked[:k]))
        held = set(self._held)
        self._train = [i for i in range(n) if i not in held]

    def held_out(self, whole: bool = False) -> "IndexedSource":
        return _DocsView(self, range(len(self)) if whole else self._held)

    def held_out_summary(self) -> str:
        n = len(self)
        share = 100 * len(self._held) / max(1, n)
        return f"{len(self._held)} of {n} documents ({share:.1f}%, chosen by a hash of their names)"

    def lane_weights(self, lanes: int) -> List[float]:
        docs = self.training_docs()
        order = _epoch_order(len(docs), self.seed, self.name, 0, self.shuffle)
        return [
            float(sum(self.doc_weight(docs[order[i]]) for i in range(lane, len(order), lanes))) for lane in range(lanes)
        ]

    def records(self, epoch, lane, lanes, pos=None):
        docs = self.training_docs()
        order = _epoch_order(len(docs), self.seed, self.name, epoch, self.shuffle)
        k = pos or 0
        for i in range(lane + k * lanes, len(order), lanes):
            k += 1
            loc, rec = self.item(docs[order[i]])
            yield loc, rec, k


class _DocsView(IndexedSource):
    """Some documents of an indexed source (its held-out ones), in natural order, unshuffled."""

    def __init__(self, parent: IndexedSource, docs: Sequence[int]):
        super().__init__(parent.name, parent.domain, parent.weight, parent.seed, shuffle=False)
        self.kind, self.text_field = parent.kind, parent.text_field
        self.parent, self.docs = parent, list(docs)

    def __len__(self):
        return len(self.docs)

    def item(self, i):
        return self.parent.item(self.docs[i])

    def doc_weight(self, i):
        return self.parent.doc_weight(self.docs[i])


def _holdout_rank(key: str) -> bytes:
    return hashlib.sha256(b"lemur-holdout\0" + key.encode("utf-8", "surrogatepass")).digest()[:8]


def _check_fraction(name: str, fraction: float, setting: str) -> float:
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise DataConfigError(f"source {name!r}: {setting}={fraction} must be a fraction in [0, 1)")
    return fraction


def holdout_fraction(name: str, scfg, data_cfg) -> Tuple[float, str]:
    """A source's held-out fraction and the setting it comes from (its own `holdout`, else `data.holdout`)."""
    own = scfg.get("holdout") if hasattr(scfg, "get") else None
    if own is not None:
        return float(own), f"data.sources.{name}.holdout"
    return float(data_cfg.get("holdout", 0.0) or 0.0), "data.holdout"


def _common_dir(paths: Sequence[str]) -> str:
    prefix = os.path.commonprefix(list(paths)) if paths else ""
    return prefix[: prefix.rfind("/") + 1]


class FileDocsSource(IndexedSource):
    """One document per file: the built-in code corpus and plain-text trees (local or fsspec URLs)."""

    def __init__(
        self, name, domain, weight, seed, shuffle, files: Sequence[Tuple[str, int]], storage: Optional[Storage] = None
    ):
        super().__init__(name, domain, weight, seed, shuffle)
        self.files = [(str(p), int(s)) for p, s in files]
        self.storage = storage or Storage()

    def __len__(self):
        return len(self.files)

    def doc_key(self, i):
        if not hasattr(self, "_root"):
            self._root = _common_dir([p for p, _ in self.files])
        return self.files[i][0][len(self._root) :]

    def doc_weight(self, i):
        return self.files[i][1]

    def fingerprint(self):
        return {**super().fingerprint(), "files": _files_digest(self.files)}

    def item(self, i):
        path, size = self.files[i]
        try:
            raw = self.storage.read(path, 0, size)
        except DataReadError as exc:
            raise DataReadError(f"source {self.name!r}: {exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            return f"{path}:{line}", Bad(UNDECODABLE, f"undecodable utf-8 bytes at byte {exc.start}")
        return f"{path}:1", _check_text(text, "text")


class BuiltinTextSource(IndexedSource):
    """Python's documentation topics (`pydoc_data.topics`), one document per topic, sorted by key."""

    kind = "builtin_text"

    def __init__(self, name, domain, weight, seed, shuffle):
        super().__init__(name, domain, weight, seed, shuffle)
        from pydoc_data.topics import topics

        self.keys = sorted(topics)

    def __len__(self):
        return len(self.keys)

    def doc_key(self, i):
        return self.keys[i]

    def doc_weight(self, i):
        from pydoc_data.topics import topics

        return len(topics[self.keys[i]])

    def item(self, i):
        from pydoc_data.topics import topics

        key = self.keys[i]
        return f"pydoc_data.topics[{key!r}]", _check_text(topics[key], "text")


def builtin_code_files() -> List[str]:
    """The standard library's own .py files (no site-packages, no test suites), sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    # empty files (bare __init__.py) are not documents; leaving them out keeps the smoke log clean
    return sorted(p for p in out if os.path.getsize(p) > 0)


# -- file listing (resolved once, on rank 0, and shared) -----------------------------------------------------

JSONL, GZ, JSON_ARRAY, PARQUET = "jsonl", "jsonl.gz", "json_array", "parquet"


@dataclass(frozen=True)
class FileInfo:
    path: str  # local path or fsspec URL
    size: int
    fmt: str  # jsonl | jsonl.gz | json_array | parquet
    # parquet: (rows, bytes of the columns read) per row group
    groups: Tuple[Tuple[int, int], ...] = ()


@dataclass
class Listing:
    files: List[FileInfo] = field(default_factory=list)


def _files_digest(files: Sequence[Tuple[str, int]]) -> str:
    """Names and sizes of a source's files, as a short digest (a changed file list or a rewritten file)."""
    h = hashlib.sha256()
    for path, size in files:
        h.update(f"{path}\0{size}\n".encode())
    total = sum(s for _, s in files)
    return f"{len(files)} files, {total} bytes, sha256 {h.hexdigest()[:16]}"


_EXTS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson"),
    "parquet": (".parquet",),
    "text": None,
    "hf": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".parquet"),
}


def _expand_sized(name: str, path: Optional[str], kind: str) -> List[Tuple[str, int]]:
    """(path, size) of each file of a path, folder or glob, local or an fsspec URL; sorted by path."""
    if not path:
        raise DataConfigError(f"source {name!r}: kind {kind} needs a path (a file, folder, glob or URL)")
    exts = _EXTS.get(kind)
    if is_url(path):
        return _expand_url(name, path, kind, exts)
    path = os.path.expanduser(path)
    if any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataConfigError(f"source {name!r}: glob {path!r} matches no files")
    elif not os.path.exists(path):
        raise DataConfigError(f"source {name!r}: path {path!r} does not exist")
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if exts is None or f.endswith(exts))
        if not files:
            raise DataConfigError(f"source {name!r}: folder {path!r} holds no {kind} files")
    else:
        files = [path]
    return [(p, os.path.getsize(p)) for p in files]


def _expand_url(name, url, kind, exts) -> List[Tuple[str, int]]:
    storage = Storage(retries=3, backoff_s=0.5)
    try:
        fs, p = fs_and_path(url)
    except (ImportError, ValueError) as exc:
        raise DataConfigError(f"source {name!r}: cannot open {url!r}: {exc}") from None
    try:
        if any(c in p for c in "*?["):
            found = storage.call(url, lambda: fs.glob(p, detail=True))
            entries = {k: v for k, v in found.items() if v.get("type") != "directory"}
            if not entries:
                raise DataConfigError(f"source {name!r}: glob {url!r} matches no files")
        else:
            info = storage.call(url, lambda: fs.info(p))
            if info.get("type") == "directory":
                found = storage.call(url, lambda: fs.find(p, detail=True))
                entries = {k: v for k, v in found.items() if exts is None or k.endswith(exts)}
                if not entries:
                    raise DataConfigError(f"source {name!r}: folder {url!r} holds no {kind} files")
            else:
                entries = {p: info}
    except DataReadError as exc:
        raise DataConfigError(f"source {name!r}: cannot list {exc}") from None
    out = []
    for key in sorted(entries):
        size = entries[key].get("size")
        if size is None:
            raise DataConfigError(
                f"source {name!r}: {fs.unstrip_protocol(key)} has no known size (the server sends no Content-Length)"
            )
        out.append((fs.unstrip_protocol(key), int(size)))
    return out


def _file_format(name: str, path: str, storage: Storage) -> str:
    base = path.rsplit("?", 1)[0]
    if base.endswith(".parquet"):
        return PARQUET
    if base.endswith(".gz"):
        return GZ
    if base.endswith((".zst", ".bz2", ".xz", ".lz4", ".zip")):
        raise DataConfigError(
            f"source {name!r}: {path} is compressed in a format the readers cannot split or stream; "
            "decompress it (JSON lines split by bytes) or recompress as .gz"
        )
    if base.endswith((".csv", ".tsv", ".arrow", ".txt")):
        raise DataConfigError(
            f"source {name!r}: {path}: only JSON lines (.jsonl/.json, optionally .gz) and parquet are read; convert it"
        )
    if base.endswith(".json"):
        head = storage.read(path, 0, 256).lstrip()
        if head.startswith(b"["):
            return JSON_ARRAY
    return JSONL


def _parquet_groups(
    name: str, path: str, size: int, storage: Storage, column: Optional[str]
) -> Tuple[Tuple[int, int], ...]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(storage.open(path, size), pre_buffer=False).metadata
    except DataReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataConfigError(
            f"source {name!r}: {path} is not a readable parquet file: {str(exc).splitlines()[0]}"
        ) from None
    names = meta.schema.to_arrow_schema().names
    leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]
    idx = None
    if column is not None:
        if column not in names:
            raise DataConfigError(
                f"source {name!r}: {path} has no column {column!r} (columns: {names}); set text_field"
            )
        idx = leaves.index(column) if column in leaves else None  # a nested column: weigh the whole row group
    groups = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        nbytes = (
            rg.column(idx).total_compressed_size
            if idx is not None
            else sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        )
        groups.append((rg.num_rows, int(nbytes)))
    return tuple(groups)


def _hf_data_files(name: str, cfg) -> List[str]:
    """The data files of an HF dataset (hub id, local folder, or packaged builder json/parquet + data_files),
    resolved the way `datasets` resolves them (README configs, data_dir, split patterns)."""
    import datasets

    path = os.path.expanduser(cfg.path)
    looks_local = cfg.path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.exists(path):
        raise DataConfigError(f"source {name!r}: HF dataset folder {cfg.path!r} does not exist")
    try:
        builder = datasets.load_dataset_builder(
            path, name=cfg.hf_config, data_files=_plain(cfg.get("data_files")), data_dir=cfg.get("data_dir")
        )
    except Exception as exc:  # datasets raises several types (DatasetNotFoundError, FileNotFoundError, ValueError)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataConfigError(
            f"source {name!r}: cannot open HF dataset {cfg.path!r} (config {cfg.hf_config!r}): "
            f"{type(exc).__name__}: {first}"
        ) from None
    files = builder.config.data_files
    if not files:
        raise DataConfigError(
            f"source {name!r}: HF dataset {cfg.path!r} has no data files the readers can split (a loading "
            "script?): set "
            "data_files to its JSON-lines or parquet files, or path to its parquet conversion (revision "
            "refs/convert/parquet)"
        )
    split = str(cfg.split)
    if split not in {str(k) for k in files}:
        raise DataConfigError(
            f"source {name!r}: HF dataset {cfg.path!r} has no split {split!r} (splits: {sorted(map(str, files))})"
        )
    return [str(f) for f in files[next(k for k in files if str(k) == split)]]


def resolve_listing(
    name: str, cfg, text_column: Optional[str] = "text", storage: Optional[Storage] = None
) -> Optional[Listing]:
    """List a source's files with sizes (and parquet row groups): the only start-up reads (footers, a JSON
    file's first bytes). None for the built-in kinds. Config problems and unreadable files: DataConfigError."""
    kind = cfg.kind
    if kind not in ("text", "jsonl", "parquet", "hf"):
        return None
    storage = storage or Storage(retries=3, backoff_s=0.5)
    if kind == "hf":
        if not cfg.path:
            raise DataConfigError(f"source {name!r}: kind hf needs path (a dataset id or local folder)")
        urls = _hf_data_files(name, cfg)
        sized = []
        for u in urls:
            sized += _expand_sized(name, u, "hf")
    else:
        sized = _expand_sized(name, cfg.path, kind)
    if kind == "text":
        return Listing([FileInfo(p, s, "text") for p, s in sized])
    out = []
    try:
        for path, size in sized:
            fmt = PARQUET if kind == "parquet" else _file_format(name, path, storage)
            groups = _parquet_groups(name, path, size, storage, text_column) if fmt == PARQUET else ()
            out.append(FileInfo(path, size, fmt, groups))
    except DataReadError as exc:
        raise DataConfigError(f"source {name!r}: cannot read {exc}") from None
    return Listing(out)


# -- shares of the address space --------------------------------------------------------------------------


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


def _split_tail(pieces: Sequence[Piece], fraction: float) -> Tuple[List[Piece], List[Piece]]:
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
        order = _epoch_order(len(self.files), self.seed, self.name, epoch, self.shuffle)
        if self._train_pieces is None:
            return [p for fi in order for p in self._file_pieces(fi)]
        return [p for fi in order for p in self._train_pieces.get(fi, ())]

    def set_holdout(self, fraction: float, setting: str) -> None:
        self.holdout = _check_fraction(self.name, fraction, setting)
        self._shares = {}
        self._train_pieces, self._held_pieces = None, []
        if not fraction:
            return
        natural = self._natural_pieces()
        train, held = _split_tail(natural, fraction)
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
            order = _epoch_order(lanes, self.seed, self.name + "/lanes", epoch, self.shuffle)
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
            "files": _files_digest([(f.path, f.size) for f in self.files]),
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
        share = self.shares(epoch, lanes)[lane]
        first, cur, line = pos if pos is not None else (0, None, 0)
        for si in range(first, len(share)):
            seg = share[si]
            f = self.files[seg.file]
            start = (cur, line) if si == first else (None, 0)
            try:
                if f.fmt == JSONL:
                    it = self._jsonl(f, seg, *start)
                elif f.fmt == GZ:
                    it = self._gz(f, seg, *start)
                elif f.fmt == JSON_ARRAY:
                    it = self._json_array(f, seg, *start)
                else:
                    it = self._parquet(f, seg, *start)
                for loc, rec, ncur, nline in it:
                    yield loc, rec, (si, ncur, nline)
            except DataReadError as exc:
                raise DataReadError(f"source {self.name!r}: {exc}") from None

    def _jsonl(self, f: FileInfo, seg: Segment, cur, line):
        """Lines starting in [seg.lo, seg.hi): (location, record, next line's offset, its line number or 0)."""
        if cur is None:
            cur, line = seg.lo, (1 if seg.lo == 0 else 0)
            align = seg.lo > 0
        else:
            align = False
        for off, raw in _lines(self.storage, f.path, f.size, cur, seg.hi, align, self.read_block):
            nxt = off + len(raw)
            loc = f"{f.path}:{line}" if line else f"{f.path} (byte {off})"
            yield loc, self._parse(raw), nxt, (line + 1 if line else 0)
            line = line + 1 if line else 0

    def _gz(self, f: FileInfo, seg: Segment, cur, line):
        """Every stride-th line of a whole gzipped file (decompressed offsets: a resume re-inflates up to there)."""
        raw = io.BufferedReader(self.storage.open(f.path, f.size), READ_BLOCK)
        with gzip.GzipFile(fileobj=raw) as gz:
            cur, line = (0, 1) if cur is None else (cur, line)
            if cur:
                try:
                    gz.seek(cur)
                except (OSError, EOFError) as exc:
                    raise DataReadError(f"{f.path}: {exc}") from None
            while True:
                try:
                    data = gz.readline()
                except (OSError, EOFError, gzip.BadGzipFile) as exc:
                    if isinstance(exc, DataReadError):
                        raise
                    raise DataReadError(f"{f.path}: corrupt gzip data near line {line}: {exc}") from None
                if not data:
                    return
                cur += len(data)
                if (line - 1) % seg.stride == seg.rank:
                    yield f"{f.path}:{line}", self._parse(data), cur, line + 1
                line += 1

    def _json_array(self, f: FileInfo, seg: Segment, cur, line):
        raw = self.storage.read(f.path, 0, f.size)
        try:
            items = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataReadError(f"{f.path}: not a JSON array: {exc}") from None
        if not isinstance(items, list):
            raise DataReadError(f"{f.path}: not a JSON array of objects")
        for i in range(cur or seg.rank, len(items), seg.stride):
            obj = items[i]
            rec = (
                self.record(obj)
                if isinstance(obj, dict)
                else Bad(MALFORMED_JSON, f"a JSON {type(obj).__name__}, not an object")
            )
            yield f"{f.path}[{i}]", rec, i + seg.stride, 0

    def _columns(self) -> Optional[List[str]]:
        return [self.text_field]

    def _parquet(self, f: FileInfo, seg: Segment, cur, line):
        from lemur_torch.data.parquet_pages import read_rows

        row = seg.lo if cur is None else cur
        starts = [0]
        for rows, _ in f.groups:
            starts.append(starts[-1] + rows)
        pf = None
        g = max(0, bisect.bisect_right(starts, row) - 1)
        while row < seg.hi and g < len(f.groups):
            hi = min(seg.hi, starts[g + 1])
            if row < hi:
                pf, table = read_rows(
                    self.storage, f.path, f.size, pf, g, row - starts[g], hi - starts[g], self._columns()
                )
                for i, obj in enumerate(table.to_pylist()):
                    yield f"{f.path}#{row + i}", self.record(obj), row + i + 1, 0
                row = hi
            g += 1

    def _parse(self, raw: bytes) -> Union[str, Bad]:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Bad(UNDECODABLE, f"undecodable utf-8 bytes at column {exc.start + 1}")
        if not line.strip():
            return Bad(EMPTY, "blank line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            return Bad(MALFORMED_JSON, f"malformed JSON: {exc.msg} at column {exc.colno}")
        if not isinstance(obj, dict):
            return Bad(MALFORMED_JSON, f"a JSON {type(obj).__name__}, not an object")
        return self.record(obj)


def _lines(storage: Storage, path: str, size: int, start: int, stop: int, align: bool, block: int = READ_BLOCK):
    """(offset, bytes) of the lines of a file that start in [start, stop), read in ranged blocks. `start` is a
    line start, or (align) any offset: then lines start after the first newline at or after start - 1."""
    pos = start - 1 if align else start  # next byte to read
    pending, pend_off = b"", pos  # an unfinished line and its offset
    dropping = align
    while True:
        if not dropping and pend_off >= stop:
            return
        want = block if pos < stop else TAIL_BLOCK  # past the share's end: just finish its last line
        data = storage.read(path, pos, min(size, pos + min(want, max(stop - pos, TAIL_BLOCK))))
        if not data:
            if pending and not dropping and pend_off < stop:
                yield pend_off, pending
            return
        pos += len(data)
        buf, buf_off = pending + data, pend_off
        i = 0
        if dropping:
            nl = buf.find(b"\n")
            if nl < 0:
                pending, pend_off = b"", pos
                continue
            i, dropping = nl + 1, False
        while True:
            nl = buf.find(b"\n", i)
            if nl < 0:
                break
            if buf_off + i >= stop:
                return
            yield buf_off + i, buf[i : nl + 1]
            i = nl + 1
        pending, pend_off = buf[i:], buf_off + i


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def source_identity(cfg) -> Dict[str, object]:
    """The config settings that say which data a file source is (for the resume fingerprint)."""
    out = {"path": cfg.path}
    if cfg.kind == "hf":
        out.update(
            hf_config=cfg.hf_config,
            split=cfg.split,
            data_dir=cfg.get("data_dir"),
            data_files=_plain(cfg.get("data_files")),
        )
    return out


def build_source(
    name: str, cfg, seed: int, listing: Optional[Listing] = None, storage: Optional[Storage] = None
) -> Source:
    """Build one source from its SourceConfig; every config problem raises DataConfigError naming the source.
    `listing` (from `resolve_listing`, possibly on another rank) saves listing the files here."""
    kind, domain = cfg.kind, cfg.domain
    weight = float(cfg.weight)
    if not weight > 0:
        raise DataConfigError(f"source {name!r}: weight must be positive, got {cfg.weight}")
    shuffle = bool(cfg.get("shuffle", True))
    storage = storage or Storage()
    if kind == "builtin_code":
        src = FileDocsSource(
            name, domain, weight, seed, shuffle, [(p, os.path.getsize(p)) for p in builtin_code_files()], storage
        )
        src.kind = kind
        return src
    if kind == "builtin_text":
        return BuiltinTextSource(name, domain, weight, seed, shuffle)
    if kind not in ("text", "jsonl", "parquet", "hf"):
        raise DataConfigError(
            f"source {name!r}: unknown kind {kind!r}; use builtin_code, builtin_text, jsonl, parquet, text or hf"
        )
    listing = listing if listing is not None else resolve_listing(name, cfg, cfg.text_field, storage)
    if kind == "text":
        src = FileDocsSource(name, domain, weight, seed, shuffle, [(f.path, f.size) for f in listing.files], storage)
        src.kind = kind
        return src
    return FileSource(name, domain, weight, seed, shuffle, kind, listing, cfg.text_field, storage, source_identity(cfg))
