"""Document readers: what a document is, where it lives, and how a lane reads its share of it.

A source is a sequence of *records* per epoch (a file, a JSON line, a parquet row, an HF example), each with a
location (`file:line`, `file#row`, `dataset[split]#index`) used in bad-input reports. A record is either a
document's text or a `Bad` (malformed JSON, missing text field, empty text, undecodable bytes); records are
indexed including the bad ones, so an index is a stable position that resume can return to.

`Source.iter_records(epoch, start, step)` yields records start, start+step, start+2*step, ... of that epoch: the
lane structure (see loader.py) gives lane l of L the records l, l+L, l+2L, ... so shares are disjoint without any
coordination. Readers stream: nothing holds more than one record (or one parquet row group) at a time.

Per-epoch order: file-per-document sources (builtin corpus, text trees) permute their documents with
(seed, source, epoch); jsonl and parquet permute their *files* (records within a file stay in order, so reading
stays sequential); HF streaming datasets are read in their own order. `shuffle: false` keeps the natural order.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random
import sysconfig
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

log = logging.getLogger("lemur_torch.data")

# reasons a record is skipped (keys of the per-source skip counters)
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
EMPTY = "empty"
UNDECODABLE = "undecodable"
REASONS = (MALFORMED_JSON, MISSING_FIELD, EMPTY, UNDECODABLE)

_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class DataConfigError(ValueError):
    """A data config problem found before training starts; the message names the source and what to fix."""


class BadInputError(ValueError):
    """Raised in strict mode: a record that would otherwise be skipped; the message names file:line."""


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


class Source:
    """One configured source. Subclasses implement `_records(epoch)` or override `iter_records`."""

    kind = "?"

    def __init__(self, name: str, domain: str, weight: float, seed: int, shuffle: bool = True):
        self.name, self.domain, self.weight, self.seed, self.shuffle = name, domain, weight, seed, shuffle

    def num_records(self) -> Optional[int]:
        """Records per epoch when cheap to know (None for streaming datasets); used to validate lanes."""
        return None

    def record(self, obj: dict):
        """The record of one JSON object or HF example: its text field (chat sources make a conversation of it)."""
        return _check_text(obj.get(self.text_field), self.text_field)

    def iter_records(self, epoch: int, start: int, step: int) -> Iterator[Record]:
        for i, rec in enumerate(self._records(epoch)):
            if i >= start and (i - start) % step == 0:
                yield rec

    def _records(self, epoch: int) -> Iterator[Record]:  # pragma: no cover - abstract
        raise NotImplementedError


class FileDocsSource(Source):
    """One document per file: the built-in code corpus and plain-text trees."""

    def __init__(self, name, domain, weight, seed, shuffle, files: Sequence[str]):
        super().__init__(name, domain, weight, seed, shuffle)
        self.files = list(files)

    def num_records(self):
        return len(self.files)

    def iter_records(self, epoch, start, step):
        order = _epoch_order(len(self.files), self.seed, self.name, epoch, self.shuffle)
        for i in range(start, len(order), step):  # random access: other lanes' files are never opened
            path = self.files[order[i]]
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = raw[: exc.start].count(b"\n") + 1
                yield f"{path}:{line}", Bad(UNDECODABLE, f"undecodable utf-8 bytes at byte {exc.start}")
                continue
            yield f"{path}:1", _check_text(text, "text")


class BuiltinTextSource(Source):
    """Python's documentation topics (`pydoc_data.topics`), one document per topic, sorted by key."""

    kind = "builtin_text"

    def __init__(self, name, domain, weight, seed, shuffle):
        super().__init__(name, domain, weight, seed, shuffle)
        from pydoc_data.topics import topics

        self.keys = sorted(topics)

    def num_records(self):
        return len(self.keys)

    def iter_records(self, epoch, start, step):
        from pydoc_data.topics import topics

        order = _epoch_order(len(self.keys), self.seed, self.name, epoch, self.shuffle)
        for i in range(start, len(order), step):
            key = self.keys[order[i]]
            yield f"pydoc_data.topics[{key!r}]", _check_text(topics[key], "text")


def builtin_code_files() -> List[str]:
    """The standard library's own .py files (no site-packages, no test suites), sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    # empty files (bare __init__.py) are not documents; leaving them out keeps the smoke log clean
    return sorted(p for p in out if os.path.getsize(p) > 0)


class JsonlSource(Source):
    """JSON lines, plain or gzipped, from a path or glob; one record per line (line numbers are 1-based)."""

    kind = "jsonl"

    def __init__(self, name, domain, weight, seed, shuffle, files, text_field):
        super().__init__(name, domain, weight, seed, shuffle)
        self.files, self.text_field = list(files), text_field
        self._counts: Optional[List[int]] = None

    def _open(self, path):
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")

    def _line_counts(self) -> List[int]:
        # one counting pass (no JSON parsing) so a reader can skip whole files on resume
        if self._counts is None:
            counts = []
            for path in self.files:
                n, last = 0, b"\n"
                with self._open(path) as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        n += chunk.count(b"\n")
                        last = chunk[-1:]
                counts.append(n + (last != b"\n"))
            self._counts = counts
        return self._counts

    def num_records(self):
        return sum(self._line_counts())

    def iter_records(self, epoch, start, step):
        counts = self._line_counts()
        base = 0  # epoch-local index of the file's first line
        for fi in _epoch_order(len(self.files), self.seed, self.name, epoch, self.shuffle):
            path, n = self.files[fi], counts[fi]
            if base + n <= start:
                base += n
                continue
            # first wanted index in this file: >= start and == start (mod step)
            first = start if base <= start else base + (start - base) % step
            with self._open(path) as f:
                for lineno, raw in enumerate(f, 1):
                    i = base + lineno - 1
                    if i < first or (i - first) % step:
                        continue
                    yield f"{path}:{lineno}", self._parse(raw)
            base += n

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


class ParquetSource(Source):
    """Parquet files from a path or glob; one record per row, read one row group at a time (text column only)."""

    kind = "parquet"

    def __init__(self, name, domain, weight, seed, shuffle, files, text_field):
        super().__init__(name, domain, weight, seed, shuffle)
        import pyarrow.parquet as pq

        self.files, self.text_field = list(files), text_field
        self.groups = []  # per file: row counts of its row groups
        for path in self.files:
            meta = pq.ParquetFile(path)
            if text_field not in meta.schema_arrow.names:
                raise DataConfigError(f"source {name!r}: {path} has no column {text_field!r} (columns: {meta.schema_arrow.names}); set text_field")
            self.groups.append([meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)])

    def num_records(self):
        return sum(sum(g) for g in self.groups)

    def iter_records(self, epoch, start, step):
        import pyarrow.parquet as pq

        base = 0
        for fi in _epoch_order(len(self.files), self.seed, self.name, epoch, self.shuffle):
            path = self.files[fi]
            pf = None
            for g, n in enumerate(self.groups[fi]):
                lo = start if base <= start else base + (start - base) % step  # first wanted index here
                if lo < base + n:
                    pf = pf or pq.ParquetFile(path)
                    col = pf.read_row_group(g, columns=[self.text_field]).column(0)
                    for i in range(lo, base + n, step):
                        yield f"{path}#{i - base + sum(self.groups[fi][:g])}", _check_text(col[i - base].as_py(), self.text_field)
                base += n


class HFSource(Source):
    """A HuggingFace dataset in streaming mode (`datasets.load_dataset(path, name, split=..., streaming=True)`)."""

    kind = "hf"

    def __init__(self, name, domain, weight, seed, shuffle, path, hf_config, split, text_field, data_files=None, data_dir=None):
        super().__init__(name, domain, weight, seed, shuffle)
        self.path, self.hf_config, self.split, self.text_field = path, hf_config, split, text_field
        self.data_files, self.data_dir = data_files, data_dir
        self.dataset = self._load()  # fails here, before training, for an unknown dataset

    def _load(self):
        import datasets

        looks_local = self.path.startswith((".", "/", "~")) or os.path.exists(self.path)
        if looks_local and not os.path.exists(os.path.expanduser(self.path)):
            raise DataConfigError(f"source {self.name!r}: HF dataset folder {self.path!r} does not exist")
        try:
            return datasets.load_dataset(
                os.path.expanduser(self.path), name=self.hf_config, split=self.split, streaming=True,
                data_files=self.data_files, data_dir=self.data_dir,
            )
        except Exception as exc:  # datasets raises several types (DatasetNotFoundError, FileNotFoundError, ValueError)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataConfigError(
                f"source {self.name!r}: cannot open HF dataset {self.path!r} (config {self.hf_config!r}, split {self.split!r}) "
                f"in streaming mode: {type(exc).__name__}: {first}"
            ) from None

    def iter_records(self, epoch, start, step):
        # lane = start mod step, k = start div step (start = lane + k*step). With at least as many shards (files)
        # as lanes, a lane streams only its own whole shards (those == lane mod step); with fewer, every lane
        # streams the dataset and keeps every step-th example (datasets' split_dataset_by_node), which costs
        # bandwidth: give HF sources at least data.lanes shards for big runs.
        from datasets.distributed import split_dataset_by_node

        lane, k = start % step, start // step
        if step == 1:
            ds = self.dataset
        elif self.dataset.num_shards >= step:
            ds = self.dataset.shard(num_shards=step, index=lane, contiguous=False)
        else:
            ds = split_dataset_by_node(self.dataset, rank=lane, world_size=step)
        if k:
            ds = ds.skip(k)
        for i, ex in enumerate(ds, k):
            yield f"{self.path}[{self.split}] lane {lane}/{step} #{i}", self.record(ex)


def _expand(name: str, path: Optional[str], kind: str) -> List[str]:
    if not path:
        raise DataConfigError(f"source {name!r}: kind {kind} needs a path (a file, folder or glob)")
    path = os.path.expanduser(path)
    if any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataConfigError(f"source {name!r}: glob {path!r} matches no files")
        return files
    if not os.path.exists(path):
        raise DataConfigError(f"source {name!r}: path {path!r} does not exist")
    if os.path.isdir(path):
        exts = {"jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"), "parquet": (".parquet",), "text": None}[kind]
        files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if exts is None or f.endswith(exts)
        )
        if not files:
            raise DataConfigError(f"source {name!r}: folder {path!r} holds no {kind} files")
        return files
    return [path]


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def build_source(name: str, cfg, seed: int) -> Source:
    """Build one source from its SourceConfig; every config problem raises DataConfigError naming the source."""
    kind, domain = cfg.kind, cfg.domain
    weight = float(cfg.weight)
    if not weight > 0:
        raise DataConfigError(f"source {name!r}: weight must be positive, got {cfg.weight}")
    shuffle = bool(cfg.get("shuffle", True))
    if kind == "builtin_code":
        src = FileDocsSource(name, domain, weight, seed, shuffle, builtin_code_files())
        src.kind = kind
    elif kind == "builtin_text":
        src = BuiltinTextSource(name, domain, weight, seed, shuffle)
    elif kind == "text":
        src = FileDocsSource(name, domain, weight, seed, shuffle, _expand(name, cfg.path, kind))
        src.kind = kind
    elif kind == "jsonl":
        src = JsonlSource(name, domain, weight, seed, shuffle, _expand(name, cfg.path, kind), cfg.text_field)
    elif kind == "parquet":
        src = ParquetSource(name, domain, weight, seed, shuffle, _expand(name, cfg.path, kind), cfg.text_field)
    elif kind == "hf":
        if not cfg.path:
            raise DataConfigError(f"source {name!r}: kind hf needs path (a dataset id or local folder)")
        src = HFSource(name, domain, weight, seed, shuffle, cfg.path, cfg.hf_config, cfg.split, cfg.text_field,
                       _plain(cfg.get("data_files")), cfg.get("data_dir"))
    else:
        raise DataConfigError(f"source {name!r}: unknown kind {kind!r}; use builtin_code, builtin_text, jsonl, parquet, text or hf")
    return src
