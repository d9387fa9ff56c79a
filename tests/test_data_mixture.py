"""The token ratio of the mixture, on the built-in corpus and on the schedule itself; the data configs."""

import os
from fractions import Fraction

import pytest
import torch
from omegaconf import OmegaConf

from lemur_torch.data import build_loader
from lemur_torch.data.mixture import Schedule
from lemur_torch.data.schema import DataConfig
from lemur_torch.data.sources import builtin_code_files
from lemur_torch.errors import DataConfigError
from lemur_torch.tokenizer import load_tokenizer

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "data")


def load_data_conf(name):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(os.path.join(CONF, f"{name}.yaml")))


@pytest.mark.slow  # tokenizes 2M tokens: seconds
def test_builtin_corpus_over_2m_tokens_is_10_to_1_code_to_text():
    tok = load_tokenizer("builtin")
    cfg = load_data_conf("sample")
    loader = build_loader(cfg, tok, 2048, 8, 0, 1, 1234)
    code_id, text_id = loader.domain_names.index("code"), loader.domain_names.index("text")

    # independent labels for document starts: the first 12 tokens of every stdlib file / pydoc topic
    from pydoc_data.topics import topics

    def heads(texts):
        return {tuple(ids[:12]) for ids in tok(texts, add_special_tokens=False).input_ids if len(ids) >= 12}

    code_heads = heads([open(p, encoding="utf-8", errors="replace").read() for p in builtin_code_files()])
    text_heads = heads(list(topics.values()))

    counts = torch.zeros(len(loader.domain_names), dtype=torch.long)
    n, checked = 0, 0
    for batch in loader:
        counts += torch.bincount(batch["domain_ids"].flatten().long(), minlength=len(loader.domain_names))
        n += batch["input_ids"].numel()
        # every document start (BOS, label -100) must open a document of the domain the row claims
        ids, dom = batch["input_ids"], batch["domain_ids"]
        for r, t in (batch["labels"] == -100).nonzero().tolist():
            head = tuple(ids[r, t + 1 : t + 13].tolist())
            assert ids[r, t] == tok.bos_token_id
            if len(head) == 12 and tok.eos_token_id not in head:  # documents of >= 12 tokens, within the row
                assert head in (code_heads if dom[r, t] == code_id else text_heads)
                checked += 1
        if n >= 2_000_000:
            break
    assert checked > 300
    ratio = counts[code_id].item() / counts[text_id].item()
    assert abs(ratio / 10 - 1) < 0.01, ratio
    assert loader.stats()["token_frac/text"] == pytest.approx(counts[text_id].item() / n)


@pytest.mark.parametrize(
    "weights,lanes", [([10, 1], 12), ([2, 1], 12), ([4.0, 1.5, 1.5, 0.5, 2.5, 0.4, 0.6], 8), ([1, 1, 1], 6)]
)
def test_schedule_keeps_every_prefix_within_two_rows_and_every_lane_sees_every_source(weights, lanes):
    names = [f"s{i}" for i in range(len(weights))]
    sched = Schedule(names, weights, lanes)
    total = sum(Fraction(str(float(w))) for w in weights)
    share = [Fraction(str(float(w))) / total for w in weights]
    counts = [0] * len(weights)
    seen = [set() for _ in range(lanes)]
    n = 3 * sched.superblock + 13
    for g in range(n):
        assert sched.rows_before(g) == counts
        s = sched.source_at(g)
        counts[s] += 1
        seen[g % lanes].add(s)
        assert all(abs(c - (g + 1) * p) < 2 for c, p in zip(counts, share)), (g, counts)
    assert all(len(s) == len(weights) for s in seen)


def test_non_positive_weights_are_rejected():
    with pytest.raises(DataConfigError, match="'b'"):
        Schedule(["a", "b"], [1.0, 0.0])


@pytest.mark.parametrize("name", ["sample", "lemur_pretrain"])
def test_data_configs_compose_and_mix_code_and_text_10_to_1(name):
    cfg = load_data_conf(name)
    by_domain = {}
    for src in cfg.sources.values():
        assert src.weight > 0
        by_domain[src.domain] = by_domain.get(src.domain, 0) + Fraction(str(src.weight))
    assert by_domain == {"code": 10 * by_domain["text"], "text": by_domain["text"]}
    if name == "lemur_pretrain":
        # remote, and in a layout the lanes can split: hub datasets resolved to their files, or hub files by URL
        assert all(
            src.kind == "hf" or (src.kind in ("jsonl", "parquet") and src.path.startswith("hf://datasets/"))
            for src in cfg.sources.values()
        )
        assert not any(str(src.path).endswith((".gz", ".json")) for src in cfg.sources.values())
