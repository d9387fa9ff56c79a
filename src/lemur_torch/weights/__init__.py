"""Pretrained HF weights, shared by both backends and the gate: locating and checking `model.pretrained`
(pretrained.py), reading safetensors by byte range and sizing an export's output files (files.py)."""

from lemur_torch.weights.files import SafetensorsFolder, is_remote, shard_files_by_size
from lemur_torch.weights.pretrained import (
    SHAPE_KEYS,
    VOCAB_KEYS,
    check_pretrained_config,
    check_pretrained_folder,
    pad_vocab_rows,
    pretrained_location,
    resolve_pretrained,
)

__all__ = [
    "SHAPE_KEYS",
    "VOCAB_KEYS",
    "SafetensorsFolder",
    "check_pretrained_config",
    "check_pretrained_folder",
    "is_remote",
    "pad_vocab_rows",
    "pretrained_location",
    "resolve_pretrained",
    "shard_files_by_size",
]
