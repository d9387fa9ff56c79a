"""From a source's config to its reader: `build_source` picks the Source class of its kind, `source_identity`
says which data a file source is (for the resume fingerprint), `holdout_fraction` which fraction it holds out."""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from lemur_torch.data.schema import DataConfig, SourceConfig, source_config
from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.builtin import BuiltinTextSource, builtin_code_files
from lemur_torch.data.sources.file import FileSource
from lemur_torch.data.sources.indexed import FileDocsSource
from lemur_torch.data.sources.listing import FILE_KINDS, Listing, resolve_listing
from lemur_torch.data.storage import Storage
from lemur_torch.errors import DataConfigError


def holdout_fraction(name: str, source: SourceConfig, data: DataConfig) -> Tuple[float, str]:
    """A source's held-out fraction and the setting it comes from (its own `holdout`, else `data.holdout`)."""
    if source.holdout is not None:
        return float(source.holdout), f"data.sources.{name}.holdout"
    return float(data.holdout or 0.0), "data.holdout"


def source_identity(cfg: SourceConfig) -> Dict[str, object]:
    """The config settings that say which data a file source is (for the resume fingerprint)."""
    out = {"path": cfg.path}
    if cfg.kind == "hf":
        out.update(hf_config=cfg.hf_config, split=cfg.split, data_dir=cfg.data_dir, data_files=cfg.data_files)
    return out


def build_source(
    name: str, cfg, seed: int, listing: Optional[Listing] = None, storage: Optional[Storage] = None
) -> Source:
    """Build one source from its SourceConfig; every config problem raises DataConfigError naming the source.
    `listing` (from `resolve_listing`, possibly on another rank) saves listing the files here."""
    cfg = source_config(cfg)
    kind, domain = cfg.kind, cfg.domain
    weight = float(cfg.weight)
    if not weight > 0:
        raise DataConfigError(f"source {name!r}: weight must be positive, got {cfg.weight}")
    shuffle = bool(cfg.shuffle)
    storage = storage or Storage()
    if kind == "builtin_code":
        src = FileDocsSource(
            name, domain, weight, seed, shuffle, [(p, os.path.getsize(p)) for p in builtin_code_files()], storage
        )
        src.kind = kind
        return src
    if kind == "builtin_text":
        return BuiltinTextSource(name, domain, weight, seed, shuffle)
    if kind not in FILE_KINDS:
        raise DataConfigError(
            f"source {name!r}: unknown kind {kind!r}; use builtin_code, builtin_text, jsonl, parquet, text or hf"
        )
    listing = listing if listing is not None else resolve_listing(name, cfg, cfg.text_field, storage)
    if kind == "text":
        src = FileDocsSource(name, domain, weight, seed, shuffle, [(f.path, f.size) for f in listing.files], storage)
        src.kind = kind
        return src
    return FileSource(name, domain, weight, seed, shuffle, kind, listing, cfg.text_field, storage, source_identity(cfg))
