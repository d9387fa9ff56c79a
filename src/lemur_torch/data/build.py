"""`build_loader`: the loader of a run's `data:` config, the pretraining or the chat one by `data.format`.

The config enters the data pipeline here and is converted once into the typed schema (schema.py), so the
loaders read attributes and no default is written twice.
"""

from __future__ import annotations

from lemur_torch.data.chat_loader import ChatLoader
from lemur_torch.data.loader import PackedMixtureLoader
from lemur_torch.data.schema import data_config
from lemur_torch.errors import DataConfigError


def build_loader(data_cfg, tokenizer, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
    """The loader for `data_cfg` (a DataConfig, or a config built on it such as `load_config(...).data`).
    Collective when torch.distributed is initialized: every data-parallel rank calls it at the same point."""
    cfg = data_config(data_cfg)
    if cfg.format == "chat":
        return ChatLoader(cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed)
    if cfg.format != "pretrain":
        raise DataConfigError(
            f"data.format={cfg.format!r}: use pretrain (packed documents) or chat (ChatML conversations)"
        )
    return PackedMixtureLoader(cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed)
