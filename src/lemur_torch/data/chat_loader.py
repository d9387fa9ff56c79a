"""Chat batches (data.format=chat): the pretraining loader's global stream, lanes, workers and exact resume
(loader.py, mixture.py), with conversations instead of documents in the rows.

What differs from pretraining, and only that:
- records are `Conversation`s (chat_sources.py) encoded turn by turn into ids + labels (chat.py `ChatEncoder`);
- a row holds whole conversations and never splits one: `packed` puts conversations into the row in stream order
  while they fit, `padded` puts one per row; the rest of the row is `<pad>` with label -100. Every row still
  has exactly seq_len columns, so shapes are fixed;
- position_ids restart at 0 at each conversation (per-conversation attention, as for documents) and at the
  padding, which is a segment of its own; `attend_across_documents` gives 0..S-1 instead (original Lemur);
- a row's source follows the same weighted schedule (sources are mixed by rows), and a packer's position is the
  same (epoch, reader position) with offset 0, so state_dict/load_state_dict and world-size changes work unchanged.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Dict, Tuple

import numpy as np

from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.data.chat import CHAT_REASONS, NO_TRAINABLE, ChatEncoder
from lemur_torch.data.chat_sources import build_chat_source
from lemur_torch.data.loader import PackedMixtureLoader
from lemur_torch.data.packing import Packer
from lemur_torch.data.schema import DataConfig
from lemur_torch.data.sources.records import REASONS, Bad
from lemur_torch.errors import BadInputError, DataConfigError

log = logging.getLogger("lemur_torch.data")
PACKING = ("packed", "padded")


class ChatPacker(Packer):
    """Rows of whole conversations of one source's share of one lane (see the module docstring)."""

    pack = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_emit_epoch = self.epoch

    def _records(self):
        for epoch, k, loc, rec in super()._records():
            if not isinstance(rec, Bad):
                rec.loc = loc  # a conversation dropped after encoding is reported at its source line
            yield epoch, k, loc, rec

    def next_row(self, attend_across_documents: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        S = self.seq_len
        ids = np.full(S, self.tokenize.pad, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(S, dtype=np.int64)
        filled = 0
        while filled < S:
            if not self._queue:
                self._refill()
            epoch, k, item = self._queue[0]
            if isinstance(item, Bad):
                if item.reason != NO_TRAINABLE:
                    self.bad.report(self.source, item.loc, item)
                elif epoch > self._last_emit_epoch + 1:
                    raise BadInputError(
                        f"source {self.source.name!r}: lane {self.lane} of {self.lanes} has no conversation with an "
                        f"assistant token within seq_len={S} in a whole epoch; raise train.seq_len or fix the source"
                    )
                self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
                self._advance()
                continue
            n = item.shape[1]
            if filled and filled + n > S:
                break  # the next conversation starts the next row
            ids[filled : filled + n] = item[0]
            labels[filled : filled + n] = item[1]
            pos[filled : filled + n] = np.arange(n)
            filled += n
            self.docs += 1
            self._last_emit_epoch = epoch
            self._advance()
            if not self.pack:
                break
        pos[filled:] = np.arange(S - filled)
        if attend_across_documents:
            pos = np.arange(S, dtype=np.int64)
        return ids, labels, pos


class PaddedChatPacker(ChatPacker):
    pack = False


class ChatLoader(PackedMixtureLoader):
    """The batch contract for conversations; domain_ids index the sources' `domain`s."""

    reasons = REASONS + CHAT_REASONS

    def __init__(self, cfg: DataConfig, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed):
        self.chat_packing = cfg.chat_packing
        if self.chat_packing not in PACKING:
            raise DataConfigError(f"data.chat_packing={self.chat_packing!r}: use packed or padded")
        self.packer_cls = ChatPacker if self.chat_packing == "packed" else PaddedChatPacker
        try:
            ChatEncoder(tokenizer, seq_len)  # fail here, not in a worker, on a tokenizer without the ChatML tokens
        except ValueError as exc:
            raise DataConfigError(str(exc)) from None
        super().__init__(cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed)

    def build_source(self, name, scfg, listing=None):
        return build_chat_source(name, scfg, self.seed, listing, self.storage)

    def text_column(self, scfg):
        return None  # a conversation's fields are several columns

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "format": "chat", "chat_packing": self.chat_packing}

    def make_tokenize(self):
        return partial(ChatEncoder, seq_len=self.seq_len)

    def stats(self) -> Dict[str, float]:
        out = super().stats()
        own = self.own_lane_states()
        convs = sum(st.get("docs", 0) for ls in own for st in ls["src"].values())
        rows = sum(ls["m"] for ls in own)
        out["conversations"] = float(convs)
        out["conversations_per_row"] = convs / rows if rows else 0.0
        return out
