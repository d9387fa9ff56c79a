"""`check_data_config`: the data config checked before a run starts, without reading any corpus.

Called by the run's gate (lemur_torch.preflight) on every rank before the process group or the model
exists, so it only looks at what is on this machine: the format, each source's kind, fields and chat format,
and that local paths and globs match files (fsspec URLs are listed later, once, by rank 0).
Ranges (weight > 0, lanes >= 1, ...) are bounds in the schema
(data/schema.py), checked with the rest of the config. What needs the network (a hub dataset's files) is
checked where the data is opened, once the process group exists; those errors are DataConfigErrors too.
"""

from __future__ import annotations

import glob
import os
from typing import List

from lemur_torch.data.chat import DEFAULT_FIELDS
from lemur_torch.data.chat import FORMATS as CHAT_FORMATS
from lemur_torch.data.chat_sources import BUILTIN_SETS
from lemur_torch.data.schema import SourceConfig, data_config, source_config
from lemur_torch.data.sources.listing import list_files
from lemur_torch.data.storage import is_url
from lemur_torch.errors import ConfigError, DataConfigError
from lemur_torch.hub import local_or_hub

FORMATS = ("pretrain", "chat")
CHAT_PACKING = ("packed", "padded")
# kinds per data.format; a kind's reader is built by sources.build_source / chat_sources.build_chat_source
KINDS = {
    "pretrain": ("builtin_code", "builtin_text", "jsonl", "parquet", "text", "hf"),
    "chat": ("builtin_chat", "jsonl", "hf"),
}
LOCAL_KINDS = ("jsonl", "parquet", "text")


def check_data_config(data_cfg) -> None:
    """Raise ConfigError naming the key of the first problem found."""
    data_cfg = data_config(data_cfg)
    fmt = data_cfg.format
    if fmt not in FORMATS:
        raise ConfigError("data.format", f"{fmt!r}; use pretrain (packed documents) or chat (ChatML conversations)")
    if fmt == "chat" and data_cfg.chat_packing not in CHAT_PACKING:
        raise ConfigError("data.chat_packing", f"{data_cfg.chat_packing!r}; use packed or padded")
    if not data_cfg.sources:
        raise ConfigError("data.sources", "no sources: configure at least one (see conf/data/sample.yaml)")
    for name, scfg in data_cfg.sources.items():
        check_source(str(name), scfg, fmt)


def check_source(name: str, scfg, fmt: str, prefix: str = "data.sources") -> None:
    """One source's config (a SourceConfig, or a config built on it) for data.format `fmt`; `prefix.name` is
    its key in errors."""
    scfg = source_config(scfg)
    key = f"{prefix}.{name}"
    kind = scfg.kind
    if kind not in KINDS[fmt]:
        raise ConfigError(
            f"{key}.kind", f"{kind!r} is not a kind of source for data.format={fmt}; use one of {', '.join(KINDS[fmt])}"
        )
    if not str(scfg.domain or "").strip():
        raise ConfigError(f"{key}.domain", "is empty; name the domain its loss is reported under (e.g. code, text)")
    if fmt == "chat":
        _check_chat_fields(key, scfg)
    elif kind not in ("builtin_code", "builtin_text") and not str(scfg.text_field or "").strip():
        raise ConfigError(f"{key}.text_field", "is empty; name the field (or parquet column) that holds the text")
    if kind in LOCAL_KINDS and not (scfg.path and is_url(str(scfg.path))):
        # fsspec URLs are listed once the process group exists (rank 0 lists, every rank learns the answer)
        files = _local_files(name, key, scfg.path, kind)
        if kind == "parquet" and fmt == "pretrain":
            _check_parquet_column(key, files[0], scfg.text_field)
    elif kind == "hf":
        _check_hf(key, scfg)
    elif kind == "builtin_chat":
        if scfg.path not in BUILTIN_SETS:
            raise ConfigError(
                f"{key}.path", f"{scfg.path!r}; kind builtin_chat reads one of {', '.join(sorted(BUILTIN_SETS))}"
            )


def _local_files(name: str, key: str, path, kind: str) -> List[str]:
    try:
        return [p for p, _ in list_files(name, path, kind)]
    except DataConfigError as exc:
        raise ConfigError(f"{key}.path", str(exc)) from None


def _check_parquet_column(key: str, path: str, column: str) -> None:
    import pyarrow.parquet as pq  # lazy: a few hundred ms to import, and only parquet sources need it

    try:
        names = pq.ParquetFile(path).schema_arrow.names  # the footer only
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise ConfigError(
            f"{key}.path",
            f"{path} is not a readable parquet file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
        ) from None
    if column not in names:
        raise ConfigError(f"{key}.text_field", f"{path} has no column {column!r} (columns: {', '.join(names)})")


def _check_chat_fields(key: str, scfg: SourceConfig) -> None:
    fmt = scfg.chat_format
    if fmt not in CHAT_FORMATS:
        raise ConfigError(f"{key}.chat_format", f"{fmt!r}; use one of {', '.join(CHAT_FORMATS)}")
    for field_name, record_field in (scfg.fields or {}).items():
        if field_name not in DEFAULT_FIELDS:
            raise ConfigError(
                f"{key}.fields.{field_name}",
                f"is not a field any chat format reads; rename one of {', '.join(DEFAULT_FIELDS)}",
            )
        if not isinstance(record_field, str) or not record_field:
            raise ConfigError(f"{key}.fields.{field_name}", f"must name the record's field, got {record_field!r}")


def _check_hf(key: str, scfg: SourceConfig) -> None:
    if not scfg.path:
        raise ConfigError(
            f"{key}.path",
            "kind hf needs path: a hub dataset id, a local dataset folder, or a loader (json, parquet, ...) with "
            "data_files",
        )
    try:
        where, path = local_or_hub(str(scfg.path))
    except ValueError as exc:
        raise ConfigError(f"{key}.path", str(exc)) from None
    if where == "local" and not os.path.exists(path):
        raise ConfigError(f"{key}.path", f"HF dataset folder {scfg.path!r} does not exist")
    if where == "hub" and path in _packaged_loaders():
        files = scfg.data_files
        if not files:
            raise ConfigError(f"{key}.data_files", f"path={path} reads local or remote files: name them in data_files")
        for pattern in _flatten(files):
            if "://" not in pattern and not _matches(pattern):
                raise ConfigError(f"{key}.data_files", f"{pattern!r} matches no file")


def _packaged_loaders() -> set:
    # lazy: datasets takes seconds to import, and only kind hf with a packaged loader (json, parquet) needs it
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return set(_PACKAGED_DATASETS_MODULES)


def _flatten(files) -> List[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [p for v in files.values() for p in _flatten(v)]
    return [p for v in files for p in _flatten(v)]


def _matches(pattern: str) -> bool:
    pattern = os.path.expanduser(pattern)
    return bool(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else os.path.exists(pattern)
