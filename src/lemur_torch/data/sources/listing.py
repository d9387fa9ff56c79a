"""A source's files: paths, folders, globs and fsspec URLs expanded into files with their sizes, each file's
format, and for parquet the row groups from its footer. This is resolved once (on rank 0, then shared by the
loader) and never scans the data: the only start-up reads are parquet footers and a JSON file's first bytes.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from lemur_torch.data.schema import SourceConfig, source_config
from lemur_torch.data.storage import Storage, fs_and_path, is_url
from lemur_torch.errors import DataConfigError, DataReadError

JSONL, GZ, JSON_ARRAY, PARQUET = "jsonl", "jsonl.gz", "json_array", "parquet"
FILE_KINDS = ("text", "jsonl", "parquet", "hf")  # the kinds whose data is files (the others are built in)

# file name endings a folder is filtered by, per kind (text: every file)
EXTENSIONS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson"),
    "parquet": (".parquet",),
    "text": None,
    "hf": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".parquet"),
}


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


def files_digest(files: Sequence[Tuple[str, int]]) -> str:
    """Names and sizes of a source's files, as a short digest (a changed file list or a rewritten file)."""
    h = hashlib.sha256()
    for path, size in files:
        h.update(f"{path}\0{size}\n".encode())
    total = sum(s for _, s in files)
    return f"{len(files)} files, {total} bytes, sha256 {h.hexdigest()[:16]}"


def list_files(name: str, path: Optional[str], kind: str) -> List[Tuple[str, int]]:
    """(path, size) of each file of a path, folder or glob, local or an fsspec URL; sorted by path."""
    if not path:
        raise DataConfigError(f"source {name!r}: kind {kind} needs a path (a file, folder, glob or URL)")
    exts = EXTENSIONS.get(kind)
    if is_url(path):
        return _list_url(name, path, kind, exts)
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


def _list_url(name, url, kind, exts) -> List[Tuple[str, int]]:
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
    import pyarrow.parquet as pq  # lazy: a few hundred ms to import, and only parquet files need it

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


def _hf_data_files(name: str, cfg: SourceConfig) -> List[str]:
    """The data files of an HF dataset (hub id, local folder, or packaged builder json/parquet + data_files),
    resolved the way `datasets` resolves them (README configs, data_dir, split patterns)."""
    import datasets  # lazy: seconds to import, and only kind hf needs it

    path = os.path.expanduser(cfg.path)
    looks_local = cfg.path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.exists(path):
        raise DataConfigError(f"source {name!r}: HF dataset folder {cfg.path!r} does not exist")
    try:
        builder = datasets.load_dataset_builder(
            path, name=cfg.hf_config, data_files=cfg.data_files, data_dir=cfg.data_dir
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
    """List a source's files (`cfg`: its SourceConfig) with sizes (and parquet row groups). None for the built-in
    kinds. Config problems and unreadable files: DataConfigError."""
    cfg = source_config(cfg)
    kind = cfg.kind
    if kind not in FILE_KINDS:
        return None
    storage = storage or Storage(retries=3, backoff_s=0.5)
    if kind == "hf":
        if not cfg.path:
            raise DataConfigError(f"source {name!r}: kind hf needs path (a dataset id or local folder)")
        urls = _hf_data_files(name, cfg)
        sized = []
        for u in urls:
            sized += list_files(name, u, "hf")
    else:
        sized = list_files(name, cfg.path, kind)
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
