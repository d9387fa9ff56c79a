"""Typed schema of the `data:` config group (owned by the data pipeline; imported by lemur_torch.config), and
the conversion of a composed config into these dataclasses.

The data pipeline reads its settings as attributes of the dataclasses below, converted once where a config
enters it (`data_config`, `source_config`: `OmegaConf.to_object`), so every default is written here and only
here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Type, TypeVar

from omegaconf import DictConfig, OmegaConf

from lemur_torch.fields import Choice, bounded

T = TypeVar("T")


class ResumeStream(Choice):
    exact = "exact"
    restart = "restart"


@dataclass
class SourceConfig:
    # builtin_code | builtin_text | jsonl | parquet | text | hf
    kind: str = "jsonl"
    # domain reported in the per-domain loss (e.g. code, text)
    domain: str = "code"
    # relative weight in the token mixture
    weight: float = bounded(1.0, gt=0, hint="it is the source's relative share of the mixture")
    # jsonl/parquet/text: a file, folder or glob, local or an fsspec URL (s3://, gs://, hf://datasets/..., https://);
    # hf: a hub dataset id, a local dataset folder, or json/parquet with data_files
    path: Optional[str] = None
    text_field: str = "text"
    # HF datasets only
    hf_config: Optional[str] = None
    split: str = "train"
    # HF only: data_dir (e.g. data/python in bigcode/the-stack-dedup) and data_files (e.g. path=json + local files)
    data_dir: Optional[str] = None
    data_files: Optional[Any] = None
    # per epoch, a seeded permutation (seed, source, epoch) of the documents for one-file-per-document kinds
    # (builtin_*, text); of the files, and of which lane reads which share, for jsonl/parquet/hf (reads stay
    # sequential inside a share). Part of the resume identity: changing it changes what positions mean
    shuffle: bool = True
    # data.format=chat only (kinds jsonl, hf, builtin_chat): messages (OpenAI role/content) | sharegpt
    # (conversations with from/value) | alpaca (instruction/input/output) | auto (by the fields each record has).
    # For kind=builtin_chat, path names the built-in set: pydoc_topics or stdlib_functions.
    chat_format: str = "auto"
    # data.format=chat only: the record's field for each field a format reads, when the dataset names it
    # differently, e.g. OpenOrca as alpaca: {system: system_prompt, instruction: question, output: response}
    fields: Dict[str, str] = field(default_factory=dict)
    # fraction of this source kept out of training for validation (eval.*); null = data.holdout. Part of the
    # resume identity: changing it changes what training reads (sources/base.py, "Held-out slices")
    holdout: Optional[float] = bounded(None, ge=0, lt=1, hint="a fraction of the source")


@dataclass
class DataConfig:
    name: str = "sample"
    # "builtin" = the 32000-piece Llama-family SentencePiece model shipped in mistral-common;
    # otherwise a folder or hub id that AutoTokenizer can load.
    tokenizer: str = "builtin"
    sources: Dict[str, SourceConfig] = field(default_factory=dict)
    # pretrain: documents packed into rows (stage 1) | chat: ChatML conversations with loss on the assistant
    # turns only (stage 2; data/chat.py); a chat run also needs model.vocab_size >= 32005 (32064 padded)
    format: str = "pretrain"
    # chat only: packed (whole conversations packed into each row, attention per conversation) | padded (one
    # conversation per row, padded with <pad>); both give fixed [B, seq_len] shapes
    chat_packing: str = "packed"
    # false: per-document attention (position_ids restart at each document); true: the original
    # Lemur/EasyLM behaviour where packed documents attend to each other.
    attend_across_documents: bool = False
    # bad input (malformed lines, missing fields, empty documents) is an error instead of skipped+counted
    strict: bool = False
    num_workers: int = bounded(0, ge=0)
    # lanes of the global stream (loader.py): fixed for a run; resume needs the same value. Make it a multiple
    # of data-parallel ranks x num_workers so that no reader tokenizes rows it does not keep.
    lanes: int = bounded(12, ge=1)
    # characters of text read per tokenizer batch and lane, split over the sources by their share of rows
    # (at least 16384 each); memory per reader ~ lanes it owns x read_chars x 2 (prefetch) x ~1.5 bytes
    read_chars: int = bounded(262144, ge=1)
    # 1: a background thread (per reader process) reads and tokenizes the next chunks while rows are packed,
    # batching many lanes' chunks into one tokenizer call; 0: the same reads, inline
    prefetch_threads: int = bounded(1, ge=0)
    # bad records logged in full per source and process; after that only counts (loader.stats())
    log_bad_records: int = bounded(5, ge=0)
    # resuming from a checkpoint: exact (continue the saved data stream; refused if the data, tokenizer or
    # layout changed) | restart (load model and optimizer, start this config's data stream at its beginning)
    resume_stream: ResumeStream = ResumeStream.exact
    # reads of remote (and local) files: retries after a transient error (connection reset, timeout, HTTP
    # 408/425/429/5xx), with exponential backoff from io_backoff_s (x0.5-1.5 jitter) up to io_max_backoff_s
    io_retries: int = bounded(8, ge=0)
    io_backoff_s: float = bounded(1.0, ge=0)
    io_max_backoff_s: float = bounded(60.0, ge=0)
    # fraction of every source held out of training for validation (eval.*), unless the source sets its own
    # `holdout`: the tail of its files in path order (JSON lines by bytes, parquet by rows), or a fixed
    # hash-chosen set of its documents (one-document-per-file and built-in kinds). Training never reads it, on
    # any number of ranks, lanes or workers, shuffled or not, in any epoch
    holdout: float = bounded(0.0, ge=0, lt=1, hint="a fraction of each source")
    extra: Dict[str, Any] = field(default_factory=dict)


def _typed(cfg: Any, schema: Type[T], what: str) -> T:
    if isinstance(cfg, schema):
        return cfg
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is schema:
        return OmegaConf.to_object(cfg)
    raise TypeError(
        f"{what} must be a {schema.__name__} or a config built on it (lemur_torch.config.load_config, or "
        f"OmegaConf.merge(OmegaConf.structured({schema.__name__}), ...)), got {type(cfg).__name__}"
    )


def data_config(cfg: Any) -> DataConfig:
    """The `data:` config as a DataConfig: one as is, or a DictConfig of that schema converted."""
    return _typed(cfg, DataConfig, "the data config")


def source_config(cfg: Any) -> SourceConfig:
    """One source's config as a SourceConfig: one as is, or a DictConfig of that schema converted."""
    return _typed(cfg, SourceConfig, "a source's config")
