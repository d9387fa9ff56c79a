"""TEMPORARY minimal loader over the built-in corpus (replaced by the streaming mixture pipeline).

Honours the batch contract; state is the number of global rows consumed, so resume on any world size works.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from typing import Dict, Iterator, List

import torch


def _docs(kind: str) -> Iterator[str]:
    if kind == "builtin_code":
        for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
    else:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]


class MinimalLoader:
    def __init__(self, data_cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed):
        self.tok, self.seq_len, self.bsz = tokenizer, seq_len, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.domain_names: List[str] = sorted({s.domain for s in data_cfg.sources.values()})
        self.kinds = [(s.kind, self.domain_names.index(s.domain)) for s in data_cfg.sources.values()]
        self.rows_consumed = 0

    def _rows(self) -> Iterator[Dict[str, torch.Tensor]]:
        gens = [(_docs(k), d) for k, d in self.kinds]
        ids: List[int] = []
        pos: List[int] = []
        lab: List[int] = []
        dom: List[int] = []
        i = 0
        while True:
            gen, d = gens[i % len(gens)]
            i += 1
            toks = [self.tok.bos_token_id] + self.tok(next(gen), add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            for j, t in enumerate(toks):
                ids.append(t)
                pos.append(j)
                lab.append(-100 if j == 0 else t)
                dom.append(d)
            while len(ids) >= self.seq_len:
                yield {
                    "input_ids": torch.tensor(ids[: self.seq_len]),
                    "labels": torch.tensor(lab[: self.seq_len]),
                    "position_ids": torch.tensor(pos[: self.seq_len]),
                    "domain_ids": torch.tensor(dom[: self.seq_len], dtype=torch.int32),
                }
                del ids[: self.seq_len], pos[: self.seq_len], lab[: self.seq_len], dom[: self.seq_len]

    def __iter__(self):
        rows = self._rows()
        for _ in range(self.rows_consumed):
            next(rows)
        while True:
            # global batch order: rank r takes the r-th group of micro_batch_size rows out of each dp_size groups
            group = [next(rows) for _ in range(self.bsz * self.dp_size)]
            mine = group[self.dp_rank * self.bsz : (self.dp_rank + 1) * self.bsz]
            self.rows_consumed += self.bsz * self.dp_size
            yield {k: torch.stack([r[k] for r in mine]) for k in mine[0]}

    def state_dict(self):
        return {"rows_consumed": self.rows_consumed}

    def load_state_dict(self, state):
        self.rows_consumed = int(state["rows_consumed"])

    def stats(self):
        return {}


def build_loader(data_cfg, tokenizer, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
    return MinimalLoader(data_cfg, tokenizer, seq_len, micro_batch_size, dp_rank, dp_size, seed)
