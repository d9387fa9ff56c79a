"""Text to token ids, with content as text: a special token's string inside a document or a message is encoded
as the characters it is made of, never as the control id. `Tokenize` wraps documents in BOS/EOS for the
packers (packing.py); chat.py's `ChatEncoder` builds on it and places the ChatML markup itself.
"""

from __future__ import annotations

import copy
from typing import List

import numpy as np


class Tokenize:
    """Batched tokenization of text as text, without BOS/EOS, through the fastest path the tokenizer has.

    Content is text: a special token's string inside a document ("<s>", "</s>", "<pad>", "<|im_end|>", ...) is
    encoded as the characters it is made of, never as the control id. HF tokenizers match added special tokens
    inside any text they encode unless told not to: the Rust tokenizer's `encode_special_tokens` flag, and
    `split_special_tokens` for slow (python) tokenizers (`batch_encoder`). Control ids come only from code that
    places them: BOS/EOS around each document here, the ChatML markup in chat.py.
    """

    def __init__(self, tokenizer):
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self._fn = batch_encoder(tokenizer, specials=False)

    def documents(self, texts: List[str]) -> List[np.ndarray]:
        """BOS + tokens + EOS per text, as int32 arrays (4 bytes a token instead of a python int's 28+8)."""
        out = []
        head = [self.bos] if self.bos is not None else []
        tail = [self.eos] if self.eos is not None else []
        for ids in self._fn(texts):
            out.append(np.array(head + ids + tail, dtype=np.int32))
        return out


def batch_encoder(tokenizer, specials: bool):
    """texts -> ids per text, no BOS/EOS; special-token strings in the texts become control ids iff `specials`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow (python) tokenizers
        return lambda texts: tokenizer(list(texts), add_special_tokens=False, split_special_tokens=not specials)[
            "input_ids"
        ]
    if not hasattr(backend, "encode_special_tokens"):
        raise RuntimeError(
            "this tokenizers version cannot encode special-token strings as text; pip install 'tokenizers>=0.15'"
        )
    # a private copy with the flag set either way: transformers flips the shared tokenizer's flag whenever it is
    # called with split_special_tokens=..., so its current value says nothing
    backend = copy.deepcopy(backend)
    backend.encode_special_tokens = not specials  # True: special-token strings are encoded as the text they are
    encode = backend.encode_batch_fast if hasattr(backend, "encode_batch_fast") else backend.encode_batch
    return lambda texts: [e.ids for e in encode(list(texts), add_special_tokens=False)]
