"""Tokenizer loading: "builtin" (the 32000-piece Llama-family SentencePiece model that ships inside the
mistral-common package, same format and special tokens as Llama-2's) or any folder / hub id; and what a run
derives from it: the chat tokenizer (ChatML tokens, chat_template), the tokenizer and generation defaults an
export saves, and the check that the model's vocabulary covers it."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from functools import lru_cache

import mistral_common

from lemur_torch.data.chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, IM_END, PAD
from lemur_torch.errors import ConfigError

BUILTIN = "builtin"
# a folder holding one of these is a tokenizer folder (fast, SentencePiece, or the config that names them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def builtin_tokenizer_dir() -> str:
    """A folder holding the built-in model as `tokenizer.model` (LlamaTokenizer ignores a bare vocab_file)."""
    src = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    if not os.path.exists(src):
        raise FileNotFoundError(f"built-in tokenizer not found at {src}; reinstall mistral-common")
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lemur_torch", "builtin_tokenizer"
    )
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
    from transformers import AutoTokenizer, LlamaTokenizer  # lazy: the first transformers import costs seconds

    if name == BUILTIN:
        return LlamaTokenizer.from_pretrained(builtin_tokenizer_dir())
    return AutoTokenizer.from_pretrained(name)


def build_tokenizer(data_cfg):
    """The tokenizer a run trains and exports with: `data.tokenizer`, plus whatever the data config adds
    (the chat stage adds ChatML special tokens and a chat_template). A tokenizer that does not load is a
    ConfigError at data.tokenizer."""
    try:
        if data_cfg.format == "chat":
            return chat_tokenizer(data_cfg.tokenizer)
        return load_tokenizer(data_cfg.tokenizer)
    except Exception as exc:  # transformers/huggingface_hub raise OSError, ValueError, HFValidationError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(
            "data.tokenizer", f"cannot load {data_cfg.tokenizer!r}: {type(exc).__name__}: {first}"
        ) from None


def serving_tokenizer(tokenizer):
    """The tokenizer as an export saves it: plain text encodes as BOS + text, as every training document starts
    (data/packing.py puts the BOS itself and encodes with add_special_tokens=False). Llama-2's own tokenizer
    already does this; the built-in one, loaded from a bare tokenizer.model, does not, and a server or harness
    using the export's tokenizer would feed prompts without the BOS the model was trained after."""
    if tokenizer.bos_token_id is None or getattr(tokenizer, "add_bos_token", True):
        return tokenizer  # no BOS, already adds it, or a tokenizer family without the switch
    tok = copy.deepcopy(tokenizer)  # the run's tokenizer (lru-cached) stays as it is
    tok.add_bos_token = True
    if hasattr(tok, "update_post_processor"):  # fast tokenizers: the flag acts through the post-processor
        tok.update_post_processor()
    return tok


def check_vocab_size(tokenizer, vocab_size: int) -> None:
    """The model's embedding must have a row for every token id the tokenizer can produce."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
            "set it to the tokenizer's size rounded up to a multiple of 64",
        )


@lru_cache(maxsize=8)
def chat_tokenizer(name: str = BUILTIN):
    """Lemur-Chat's tokenizer: `<pad>`, `<|im_start|>`, `<|im_end|>`, `<|im_sep|>`, `<|diff_marker|>` added as special
    tokens (ids 32000..32004 on the 32000-piece Llama-2 vocabulary; kept where the tokenizer has them already),
    `<pad>` as the pad token, and the ChatML chat_template that renders exactly the training text (data/chat.py).
    len() is the true size (32005); the model's vocab_size is that rounded up to a multiple of 64 (32064)."""
    tok = copy.deepcopy(load_tokenizer(name))  # the cached pretraining tokenizer stays unchanged
    tok.add_special_tokens(
        {"pad_token": PAD, "additional_special_tokens": [t for t in CHAT_SPECIAL_TOKENS if t != PAD]}
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def generation_config(tokenizer):
    """For a chat tokenizer, the exported model's generation defaults: stop at `<|im_end|>` (or EOS), pad with
    `<pad>`. None for a plain tokenizer (the model config's EOS is all a pretrained model needs)."""
    from transformers import GenerationConfig  # lazy: the first transformers import costs seconds

    im_end = tokenizer.get_vocab().get(IM_END)
    if im_end is None:
        return None
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[im_end, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
