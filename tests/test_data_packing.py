"""Packing invariants on real text, checked against the tokenizer's own per-document output and HF's own
packed-sequence detection (transformers.masking_utils.find_packed_sequence_indices)."""

import json
import os
import sysconfig

import torch
from omegaconf import OmegaConf

from lemur_torch.data import build_loader
from lemur_torch.data.schema import DataConfig

SEQ = 256


def real_docs():
    """Real text: pydoc topics, plus two stdlib modules that are longer than several rows."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)[:30]]
    std = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "bisect.py"):
        with open(os.path.join(std, name), encoding="utf-8") as f:
            docs.insert(len(docs) // 2, f.read())
    return docs


def write_jsonl(path, docs):
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")


def cfg_of(sources, **kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": sources, **kw})


def reference_stream(tok, docs, n_tokens):
    """BOS + tokens + EOS per document, documents in order, cycled; with each document-start offset."""
    ids, starts = [], []
    per_doc = [[tok.bos_token_id] + tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id] for d in docs]
    while len(ids) < n_tokens:
        for d in per_doc:
            starts.append(len(ids))
            ids.extend(d)
    return ids, set(starts)


def take_rows(loader, n_batches):
    rows = []
    for i, b in enumerate(loader):
        for r in range(b["input_ids"].shape[0]):
            rows.append({k: v[r] for k, v in b.items()})
        if i + 1 == n_batches:
            return rows


def test_rows_reproduce_documents_with_labels_and_positions(tmp_path, tok):
    docs = real_docs()
    write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = cfg_of(
        {"docs": {"kind": "jsonl", "domain": "text", "path": str(tmp_path / "docs.jsonl"), "shuffle": False}},
        lanes=1,
        read_chars=5000,
    )
    rows = take_rows(build_loader(cfg, tok, SEQ, 4, 0, 1, 0), 60)  # 240 rows = 61k tokens: more than one epoch
    ref, starts = reference_stream(tok, docs, len(rows) * SEQ)
    assert len(ref) - max(starts) < len(rows) * SEQ * 2  # the run really wraps into a second epoch
    for i, row in enumerate(rows):
        assert all(v.shape == (SEQ,) for v in row.values())
        assert row["input_ids"].dtype == torch.long and row["labels"].dtype == torch.long
        lo = i * SEQ
        assert row["input_ids"].tolist() == ref[lo : lo + SEQ]
        for t in range(SEQ):
            is_start = (lo + t) in starts
            assert row["labels"][t].item() == (-100 if is_start else ref[lo + t])
        # positions: 0 at each document start and at the row start (a continued document restarts), +1 otherwise
        expect, p = [], 0
        for t in range(SEQ):
            p = 0 if (t == 0 or (lo + t) in starts) else p + 1
            expect.append(p)
        assert row["position_ids"].tolist() == expect
        assert (row["domain_ids"] == 0).all()

    # HF's own reading of position_ids: a new segment exactly at each document start (and column 0)
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.stack([r["position_ids"] for r in rows])
    seg = find_packed_sequence_indices(pos)
    for i in range(len(rows)):
        segs = seg[i] if seg is not None else torch.zeros(SEQ, dtype=torch.long)
        boundaries = [t for t in range(1, SEQ) if segs[t] != segs[t - 1]]
        assert boundaries == [t for t in range(1, SEQ) if (i * SEQ + t) in starts]


def test_attend_across_documents_changes_only_positions(tmp_path, tok):
    docs = real_docs()[:12]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    src = {"docs": {"kind": "jsonl", "domain": "text", "path": str(tmp_path / "docs.jsonl"), "shuffle": False}}
    a = take_rows(build_loader(cfg_of(src, lanes=1), tok, SEQ, 2, 0, 1, 0), 10)
    b = take_rows(build_loader(cfg_of(src, lanes=1, attend_across_documents=True), tok, SEQ, 2, 0, 1, 0), 10)
    for ra, rb in zip(a, b):
        assert torch.equal(ra["input_ids"], rb["input_ids"]) and torch.equal(ra["labels"], rb["labels"])
        assert rb["position_ids"].tolist() == list(range(SEQ))


def test_lanes_and_sources_each_pack_their_own_share(tmp_path, tok):
    """Global row g: lane g mod L; each (lane, source) packs, in order, the documents whose lines start in its
    byte share [l*W/L, (l+1)*W/L) of the source's one file (the reference split is computed here)."""
    docs = real_docs()
    code, text = docs[:17], docs[17:]
    write_jsonl(tmp_path / "code.jsonl", code)
    write_jsonl(tmp_path / "text.jsonl", text)
    L = 3
    cfg = cfg_of(
        {
            "code": {
                "kind": "jsonl",
                "domain": "code",
                "weight": 2.0,
                "path": str(tmp_path / "code.jsonl"),
                "shuffle": False,
            },
            "text": {
                "kind": "jsonl",
                "domain": "text",
                "weight": 1.0,
                "path": str(tmp_path / "text.jsonl"),
                "shuffle": False,
            },
        },
        lanes=L,
        read_chars=3000,
    )
    loader = build_loader(cfg, tok, 128, 3, 0, 1, 0)
    assert loader.domain_names == ["code", "text"]
    rows = take_rows(loader, 80)
    # token ratio: every row is full and single-source, so domain tokens follow 2:1 within two rows at every prefix
    n_code = 0
    for g, row in enumerate(rows):
        n_code += int(row["domain_ids"][0] == 0)
        assert len(set(row["domain_ids"].tolist())) == 1
        assert abs(n_code - (g + 1) * 2 / 3) < 2
    for lane in range(L):
        for dom, src_docs, _name in ((0, code, "code.jsonl"), (1, text, "text.jsonl")):
            raw = [(json.dumps({"text": d}) + "\n").encode() for d in src_docs]
            W = sum(map(len, raw))
            starts = [sum(map(len, raw[:i])) for i in range(len(raw))]
            share = [d for d, s0 in zip(src_docs, starts) if lane * W // L <= s0 < (lane + 1) * W // L]
            mine = [r for g, r in enumerate(rows) if g % L == lane and r["domain_ids"][0] == dom]
            got = torch.cat([r["input_ids"] for r in mine]).tolist()
            ref, _ = reference_stream(tok, share, len(got))
            assert got == ref[: len(got)], (lane, dom)
