"""Tokenizer loading: "builtin" (the 32000-piece Llama-family SentencePiece model that ships inside the
mistral-common package, same format and special tokens as Llama-2's) or any folder / hub id."""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache

BUILTIN = "builtin"


def builtin_tokenizer_dir() -> str:
    """A folder holding the built-in model as `tokenizer.model` (LlamaTokenizer ignores a bare vocab_file)."""
    import mistral_common

    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(src):
        raise FileNotFoundError(f"built-in tokenizer not found at {src}; reinstall mistral-common")
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lemur_torch", "builtin_tokenizer")
    dst = os.path.join(cache, "tokenizer.model")
    if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(src):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache)
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)  # atomic: concurrent ranks never see a half-written file
    return cache


@lru_cache(maxsize=8)
def load_tokenizer(name: str = BUILTIN):
    from transformers import AutoTokenizer, LlamaTokenizer

    if name == BUILTIN:
        return LlamaTokenizer.from_pretrained(builtin_tokenizer_dir())
    return AutoTokenizer.from_pretrained(name)


def build_tokenizer(data_cfg):
    """The tokenizer a run trains and exports with: `data.tokenizer`, plus whatever the data config adds
    (the chat stage adds ChatML special tokens and a chat_template)."""
    return load_tokenizer(data_cfg.tokenizer)
