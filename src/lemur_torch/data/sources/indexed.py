"""Index-addressed sources: one document per file or item (the built-in corpora, plain-text trees, built-in
conversations). Lane l reads documents l, l+L, ... of a seeded per-epoch permutation of the training documents,
each opened alone, so nothing is read twice; a position is the index k in the lane's share. The held-out
documents are picked by a hash of their identity (base.py, "Held-out slices").
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

from lemur_torch.data.sources.base import Source, epoch_order, holdout_rank
from lemur_torch.data.sources.listing import files_digest
from lemur_torch.data.sources.records import UNDECODABLE, Bad, Record, text_record
from lemur_torch.data.storage import Storage
from lemur_torch.errors import DataConfigError, DataReadError


class IndexedSource(Source):
    """Random-access records (one document per file or item): lane l reads items l, l+L, ... of a seeded
    per-epoch permutation of the training documents; the position is the index k in that share."""

    _held: Tuple[int, ...] = ()  # held-out documents, ascending
    _train: Optional[List[int]] = None  # the other documents, ascending; None: all

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_records(self):
        return len(self.training_docs())

    def item(self, i: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    def doc_key(self, i: int) -> str:
        """Document i's identity, independent of the machine and of the other documents (picks held-out ones)."""
        return str(i)

    def doc_weight(self, i: int) -> int:
        """Document i's size (bytes or characters), known without reading it."""
        return 1

    def training_docs(self) -> Sequence[int]:
        return range(len(self)) if self._train is None else self._train

    def split_holdout(self, fraction: float, setting: str) -> None:
        self._held, self._train = (), None
        if not fraction:
            return
        n = len(self)
        k = max(1, round(fraction * n))
        if k >= n:
            raise DataConfigError(
                f"source {self.name!r}: {setting}={fraction} holds out {k} of its {n} documents, leaving "
                "none to train on; lower it"
            )
        ranked = sorted(range(n), key=lambda i: (holdout_rank(self.doc_key(i)), i))
        self._held = tuple(sorted(ranked[:k]))
        held = set(self._held)
        self._train = [i for i in range(n) if i not in held]

    def held_out(self, whole: bool = False) -> "IndexedSource":
        return DocsView(self, range(len(self)) if whole else self._held)

    def held_out_summary(self) -> str:
        n = len(self)
        share = 100 * len(self._held) / max(1, n)
        return f"{len(self._held)} of {n} documents ({share:.1f}%, chosen by a hash of their names)"

    def lane_weights(self, lanes: int) -> List[float]:
        docs = self.training_docs()
        order = epoch_order(len(docs), self.seed, self.name, 0, self.shuffle)
        return [
            float(sum(self.doc_weight(docs[order[i]]) for i in range(lane, len(order), lanes))) for lane in range(lanes)
        ]

    def records(self, epoch, lane, lanes, pos=None):
        docs = self.training_docs()
        order = epoch_order(len(docs), self.seed, self.name, epoch, self.shuffle)
        k = pos or 0
        for i in range(lane + k * lanes, len(order), lanes):
            k += 1
            loc, rec = self.item(docs[order[i]])
            yield loc, rec, k

    def describe(self, lanes: int) -> Tuple[str, float]:
        """One line for the start-up log, and the expected read amplification (bytes read / bytes of the data)."""
        n = self.num_records()
        held = f" ({len(self._held)} held out of training, chosen by a hash of their names)" if self._held else ""
        return (
            f"source {self.name!r} ({self.kind}): {len(self)} documents{held}, {n / lanes:.1f} per lane, each "
            "read once",
            1.0,
        )


class DocsView(IndexedSource):
    """Some documents of an indexed source (its held-out ones), in natural order, unshuffled."""

    def __init__(self, parent: IndexedSource, docs: Sequence[int]):
        super().__init__(parent.name, parent.domain, parent.weight, parent.seed, shuffle=False)
        self.kind, self.text_field = parent.kind, parent.text_field
        self.parent, self.docs = parent, list(docs)

    def __len__(self):
        return len(self.docs)

    def item(self, i):
        return self.parent.item(self.docs[i])

    def doc_weight(self, i):
        return self.parent.doc_weight(self.docs[i])


def _common_dir(paths: Sequence[str]) -> str:
    prefix = os.path.commonprefix(list(paths)) if paths else ""
    return prefix[: prefix.rfind("/") + 1]


class FileDocsSource(IndexedSource):
    """One document per file: the built-in code corpus and plain-text trees (local or fsspec URLs)."""

    def __init__(
        self, name, domain, weight, seed, shuffle, files: Sequence[Tuple[str, int]], storage: Optional[Storage] = None
    ):
        super().__init__(name, domain, weight, seed, shuffle)
        self.files = [(str(p), int(s)) for p, s in files]
        self.storage = storage or Storage()

    def __len__(self):
        return len(self.files)

    def doc_key(self, i):
        if not hasattr(self, "_root"):
            self._root = _common_dir([p for p, _ in self.files])
        return self.files[i][0][len(self._root) :]

    def doc_weight(self, i):
        return self.files[i][1]

    def fingerprint(self):
        return {**super().fingerprint(), "files": files_digest(self.files)}

    def item(self, i):
        path, size = self.files[i]
        try:
            raw = self.storage.read(path, 0, size)
        except DataReadError as exc:
            raise DataReadError(f"source {self.name!r}: {exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            return f"{path}:{line}", Bad(UNDECODABLE, f"undecodable utf-8 bytes at byte {exc.start}")
        return f"{path}:1", text_record(text, "text")
