"""Held-out slices and validation batches (in one process): held-out data disjoint from what training reads (the
built-in corpus, generated JSON-lines / parquet / .gz sources), stable across lanes, shuffle, seeds and epochs;
validation values against plain transformers and over simulated ranks; chat rows with the training label mask;
errors that name the setting; what the validation reader reads at many lanes and ranks."""

import gzip
import json
import math
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST
from fakes import HostBackend, tiny_model
from omegaconf import OmegaConf

from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.data.chat import ChatEncoder
from lemur_torch.data.heldout import apportion, rank_rows
from lemur_torch.data.schema import SourceConfig
from lemur_torch.data.sources import Bad, build_source, builtin_code_files
from lemur_torch.data.sources.builtin import BuiltinTextSource
from lemur_torch.data.sources.indexed import FileDocsSource
from lemur_torch.errors import ConfigError, DataConfigError
from lemur_torch.tokenizer import build_tokenizer, load_tokenizer
from lemur_torch.validation import Validator, build_validator

WORDS = [w for w in open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read().split() if w.isalpha()]
VAL = [*[o for o in FAST if not o.startswith("eval.")], "eval.every_steps=5"]


def src_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(SourceConfig), kw)


def docs_read(src, epoch, lanes):
    """The documents one epoch of every lane of `src` reads, as (location, text) in lane order."""
    return [(loc, rec) for lane in range(lanes) for loc, rec, _ in src.records(epoch, lane, lanes)]


# -- the built-in corpus --------------------------------------------------------------------------------------


def builtin_doc(loc: str) -> str:
    """A built-in document's identity from a reader's location: the stdlib path, or the pydoc topic key."""
    return loc.rsplit(":", 1)[0] if loc.endswith(":1") else loc


def test_builtin_held_out_documents_are_never_read_by_training(tok, monkeypatch):
    """Over whole epochs of every lane (epochs 0 and 1, 12 and 5 lanes, shuffled or not, two seeds) training reads
    every document of the corpus except the held-out ones, each once per epoch; the held-out ones are the same in
    every layout; the loader's stream and the validation reader open only their own side."""
    from pydoc_data.topics import topics

    corpus = {"stdlib_code": set(builtin_code_files()), "pydoc_text": {f"pydoc_data.topics[{k!r}]" for k in topics}}
    cfg = load_config(VAL)
    held_by_layout = []
    for lanes, shuffle, seed in ((12, True, 1234), (5, False, 7)):
        data = OmegaConf.merge(cfg.data, {"lanes": lanes, "sources": {n: {"shuffle": shuffle} for n in corpus}})
        loader = build_loader(data, tok, 64, 2, 0, 1, seed)
        held = {}
        for src in loader.sources:
            fraction = cfg.data.sources[src.name].holdout
            held[src.name] = {builtin_doc(loc) for loc, _ in docs_read(src.held_out(), 0, 1)}
            assert len(held[src.name]) == round(fraction * len(corpus[src.name])) > 0
            for epoch in (0, 1):
                trained = [builtin_doc(loc) for loc, _ in docs_read(src, epoch, lanes)]
                assert len(trained) == len(set(trained)), "each training document once per epoch"
                assert not set(trained) & held[src.name]
                assert set(trained) | held[src.name] == corpus[src.name]
        held_by_layout.append(held)
    assert held_by_layout[0] == held_by_layout[1]

    # what the loader's stream and the validator actually open
    opened = []
    for cls in (FileDocsSource, BuiltinTextSource):
        original = cls.item

        def recording(self, i, _original=original):
            loc, rec = _original(self, i)
            opened.append((self.name, builtin_doc(loc)))
            return loc, rec

        monkeypatch.setattr(cls, "item", recording)
    loader = build_loader(cfg.data, tok, 64, 2, 0, 1, cfg.train.seed)
    for _, _batch in zip(range(30), loader):
        pass
    assert opened and not [d for s, d in opened if d in held_by_layout[0][s]]
    opened.clear()
    Validator(cfg, loader, HostBackend(), info=lambda line: None)
    assert opened and all(d in held_by_layout[0][s] for s, d in opened)


def test_smoke_experiment_validates_code_and_text(tok):
    cfg = load_config(["experiment=smoke"])
    assert 0 < cfg.eval.every_steps <= cfg.train.max_steps
    loader = build_loader(cfg.data, tok, cfg.train.seq_len, cfg.train.micro_batch_size, 0, 1, cfg.train.seed)
    v = build_validator(cfg, loader, HostBackend(), info=lambda line: None)
    assert v.domains == ["code", "text"] and v.names == ["stdlib_code", "pydoc_text"]
    assert v.rows == [v.requested, v.requested]
    assert v.due(cfg.train.max_steps) and v.due(cfg.eval.every_steps) and not v.due(1)


# -- file sources ---------------------------------------------------------------------------------------------


def write_jsonl(path, ids, rng, gz=False):
    lines = [
        json.dumps({"text": f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 60)))}) + "\n" for i in ids
    ]
    data = "".join(lines).encode()
    (gzip.open if gz else open)(path, "wb").write(data)
    return lines


def doc_id(rec) -> int:
    return int(rec.split(":", 1)[0].split()[1])


def check_split(src, n_docs, expected_held=None):
    held = sorted(doc_id(r) for _, r in docs_read(src.held_out(), 0, 1))
    for lanes in (4, 16):
        assert sorted(doc_id(r) for _, r in docs_read(src.held_out(), 0, lanes)) == held  # any validation lanes
    if expected_held is not None:
        assert held == expected_held
    for lanes, shuffle in ((1, False), (3, True), (16, True)):
        src.shuffle = shuffle
        src._shares = {}
        for epoch in (0, 1):
            trained = [doc_id(r) for _, r in docs_read(src, epoch, lanes)]
            assert len(trained) == len(set(trained))
            assert not set(trained) & set(held)
            assert sorted(set(trained) | set(held)) == list(range(n_docs))
    return held


def test_jsonl_held_out_slice_is_the_tail_cut_at_a_line_start(tmp_path):
    """Three files in path order, 10% held out: exactly the lines whose first byte lies in the last 10% of the
    bytes laid end to end (computed here from the files), on any lanes, shuffled or not, in every epoch."""
    rng = random.Random(0)
    lines = []
    for k, ids in enumerate((range(0, 70), range(70, 100), range(100, 160))):
        lines += write_jsonl(tmp_path / f"part{k}.jsonl", ids, rng)
    starts = np.cumsum([0] + [len(line.encode()) for line in lines])
    total = starts[-1]
    for fraction in (0.1, 0.37):
        cut = total - math.ceil(total * fraction)
        expected = [i for i in range(len(lines)) if starts[i] >= cut]
        src = build_source("jl", src_cfg(kind="jsonl", domain="text", path=str(tmp_path)), seed=3)
        src.set_holdout(fraction, "data.holdout")
        assert check_split(src, len(lines), expected) == expected


def test_parquet_and_gz_held_out_slices(tmp_path):
    rng = random.Random(1)
    n = 0
    for k in range(2):  # row groups of 10 rows: the cut falls between rows inside one
        texts = [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 60))) for i in range(n, n + 55)]
        pq.write_table(pa.table({"text": texts}), tmp_path / f"p{k}.parquet", row_group_size=10)
        n += 55
    src = build_source("pq", src_cfg(kind="parquet", domain="text", path=str(tmp_path / "*.parquet")), seed=3)
    src.set_holdout(0.15, "data.holdout")
    held = check_split(src, n)
    assert held == list(range(n - len(held), n)) and 0.05 * n < len(held) < 0.3 * n  # a tail, about 15% of the bytes

    # .gz cannot be cut: it goes whole to the side of its midpoint
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    write_jsonl(gz_dir / "a.jsonl", range(0, 50), rng)
    write_jsonl(gz_dir / "b.jsonl.gz", range(50, 60), rng, gz=True)
    write_jsonl(gz_dir / "c.jsonl", range(60, 100), rng)
    src = build_source("gz", src_cfg(kind="jsonl", domain="text", path=str(gz_dir)), seed=3)
    src.set_holdout(0.5, "data.holdout")
    held = check_split(src, 100)
    assert held == list(range(100 - len(held), 100))
    assert set(range(50, 60)) <= set(held) or not set(range(50, 60)) & set(held)  # the .gz whole on one side


# -- validation values ----------------------------------------------------------------------------------------


def test_values_match_transformers_and_do_not_depend_on_the_ranks(tok):
    """The logged losses equal plain transformers' loss (labels=...) over the same rows, token-weighted per source;
    two simulated ranks build disjoint halves of the same rows and their summed results give the same values."""
    cfg = load_config([*VAL, "eval.batches=2"])
    t = cfg.train
    loader = build_loader(cfg.data, tok, t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    one = HostBackend()
    v = Validator(cfg, loader, one, info=lambda line: None)
    model = tiny_model(cfg)
    got = v.run(model, 5)
    assert model.training, "run() restores training mode"

    sums, counts, rows = {}, {}, []
    with torch.no_grad():
        for batch in v.batches:
            for r in range(batch["input_ids"].shape[0]):
                s = int(batch["domain_ids"][r, 0])
                if s == len(v.names):
                    assert (batch["labels"][r] == -100).all()  # padding carries no loss
                    continue
                row = {k: batch[k][r : r + 1] for k in ("input_ids", "position_ids", "labels")}
                rows.append((s, tuple(row["input_ids"][0].tolist()), tuple(row["labels"][0].tolist())))
                n = int((row["labels"][0, 1:] != -100).sum())
                out = model(
                    input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"], use_cache=False
                )
                sums[s] = sums.get(s, 0.0) + out.loss.item() * n
                counts[s] = counts.get(s, 0) + n
    for s, name in enumerate(v.names):
        assert got[f"val/tokens/{name}"] == counts[s]
        assert abs(got[f"val/loss/{name}"] - sums[s] / counts[s]) < 1e-5
    assert abs(got["val/loss"] - sum(sums.values()) / sum(counts.values())) < 1e-5
    assert len(rows) == sum(v.rows) == 2 * v.requested

    # two ranks: each builds its lanes, both run the same number of micro-batches, the sums add up
    parts, split_rows, micro_batches = [], [], set()
    for r in range(2):
        ld = build_loader(cfg.data, tok, t.seq_len, t.micro_batch_size, r, 2, t.seed)
        backend = HostBackend(r, 2)
        vr = Validator(cfg, ld, backend, info=lambda line: None)
        micro_batches.add(len(vr.batches))
        vr.run(model, 5)
        parts.append(backend.reduced)
        for batch in vr.batches:
            for i in range(batch["input_ids"].shape[0]):
                if int(batch["domain_ids"][i, 0]) < len(v.names):
                    split_rows.append(
                        (
                            int(batch["domain_ids"][i, 0]),
                            tuple(batch["input_ids"][i].tolist()),
                            tuple(batch["labels"][i].tolist()),
                        )
                    )
    assert sorted(split_rows) == sorted(rows)
    assert len(micro_batches) == 1  # every rank runs the same number of forward passes (FSDP's collectives)
    total = (parts[0] + parts[1]).tolist()
    k = len(v.names)
    two = v.metrics(5, total[:k], total[k + 1 : 2 * k + 1], 0.0)
    for key, value in got.items():
        if key.startswith(("val/loss", "val/tokens")):
            assert abs(two[key] - value) < 1e-5, (key, value, two[key])


def test_validation_rows_carry_boundaries_that_reach_the_attention_kernel(tok, tmp_path):
    """Validation batches carry doc_lens like training batches, and the model is called with them as in training:
    under the varlen seam (CPU reference kernel, which sees only cu_seqlens) every forward gets the boundaries of
    its rows and the values equal plain transformers' per-document attention (sdpa from position_ids)."""
    from lemur_torch import attention
    from lemur_torch.batch import document_lengths, varlen_boundaries

    write_jsonl(tmp_path / "short.jsonl", range(400), random.Random(2))  # documents of 3-60 words: several per row
    cfg = load_config(
        [
            *VAL,
            "eval.batches=1",
            "~data.sources.pydoc_text",
            "data.sources.stdlib_code.kind=jsonl",
            f"data.sources.stdlib_code.path={tmp_path / 'short.jsonl'}",
            "data.sources.stdlib_code.holdout=0.5",
        ]
    )
    t = cfg.train
    loader = build_loader(cfg.data, tok, t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    v = Validator(cfg, loader, HostBackend(), info=lambda line: None)
    assert set(next(iter(loader))) == set(v.batches[0])  # the batch contract's keys, boundaries included
    packed = 0
    for batch in v.batches:
        assert torch.equal(batch["doc_lens"], document_lengths(batch["position_ids"]))
        packed += int((batch["doc_lens"] > 0).sum(1).gt(1).sum())
    assert packed, "some validation row packs several documents (else boundaries would not matter)"
    plain = v.run(tiny_model(cfg), 5)

    seen = []

    def kernel(q, k, v_, cu_q, cu_k, max_q, max_k, **kw):
        seen.append(cu_q.clone())
        return attention.varlen_reference(q, k, v_, cu_q, cu_k, max_q, max_k, **kw)

    model = tiny_model(cfg)
    given = []
    model.model.register_forward_pre_hook(lambda m, a, kw: given.append(kw.get("cu_seq_lens_q")), with_kwargs=True)
    ref = attention.Kernel("val_ref", "CPU reference", kernel, attention.ALL_FLOATS)
    attention.install(model, attention.Selection("flash", ref, "flash"))
    got = v.run(model, 5)
    expected = [varlen_boundaries(b["doc_lens"])[0] for b in v.batches]
    assert len(given) == len(v.batches) and all(torch.equal(g, e) for g, e in zip(given, expected))  # from the batch
    assert all(torch.equal(c, expected[i // cfg.model.num_hidden_layers]) for i, c in enumerate(seen))
    for key, value in plain.items():
        if key.startswith("val/loss"):
            assert abs(got[key] - value) < 1e-5, (key, value, got[key])


def test_chat_validation_rows_are_held_out_conversations_with_the_training_label_mask():
    cfg = load_config(
        [
            "experiment=chat_smoke",
            "train.seq_len=256",
            "train.micro_batch_size=2",
            "train.global_batch_tokens=1024",
            "eval.batches=2",
        ]
    )
    tok = build_tokenizer(cfg.data)
    loader = build_loader(cfg.data, tok, 256, 2, 0, 1, cfg.train.seed)
    v = Validator(cfg, loader, HostBackend(), info=lambda line: None)
    assert v.names == ["pydoc_qa", "stdlib_functions"] and v.domains == ["code", "text"]
    encoder = ChatEncoder(tok, 256)
    expected = {}
    for src in loader.sources:
        held = docs_read(src.held_out(), 0, 1)
        assert not {loc for loc, _ in held} & {
            loc for lane in range(loader.lanes) for loc, _, _ in src.records(0, lane, loader.lanes)
        }
        for (_loc, _conv), enc in zip(held, encoder.documents([c for _, c in held])):
            if not isinstance(enc, Bad):
                expected[tuple(enc[0].tolist())] = enc[1].tolist()
    seen = 0
    for batch in v.batches:
        for r in range(batch["input_ids"].shape[0]):
            ids, labels, pos = (batch[k][r].tolist() for k in ("input_ids", "labels", "position_ids"))
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                if all(x == encoder.pad for x in ids[a:b]) or all(x == 0 for x in ids[a:b]):
                    assert all(x == -100 for x in labels[a:b])  # padding
                    continue
                assert labels[a:b] == expected[tuple(ids[a:b])]  # a whole held-out conversation, assistant tokens only
                seen += 1
    assert seen >= 8
    model = tiny_model(OmegaConf.merge(cfg, {"model": {"attention": "sdpa"}}))
    m = v.run(model, 1)
    assert math.isfinite(m["val/loss/code"]) and math.isfinite(m["val/loss/text"])


# -- errors and short slices ----------------------------------------------------------------------------------


def test_nothing_to_evaluate_says_so_and_bad_fractions_fail_naming_the_setting(tok, tmp_path):
    # sources of one's own under the smoke experiment's validation: no validation, and one line saying why
    cfg = load_config([*VAL, "data.sources.stdlib_code.holdout=0", "data.sources.pydoc_text.holdout=0"])
    loader = build_loader(cfg.data, tok, 64, 2, 0, 1, 0)
    said = []
    assert build_validator(cfg, loader, HostBackend(), info=said.append) is None
    assert len(said) == 1 and "validation off: eval.every_steps=5" in said[0] and "data.holdout" in said[0]
    with pytest.raises(ConfigError, match="eval.every_steps.*nothing to evaluate"):
        Validator(cfg, loader, HostBackend())
    assert build_validator(OmegaConf.merge(cfg, {"eval": {"every_steps": 0}}), loader, HostBackend()) is None

    with pytest.raises(DataConfigError, match=r"data.holdout=1.0 must be a fraction"):
        build_loader(
            load_config([*VAL, "data.holdout=1.0", "data.sources.stdlib_code.holdout=null"]).data, tok, 64, 2, 0, 1, 0
        )
    with pytest.raises(
        DataConfigError, match=r"'pydoc_text'.*data.sources.pydoc_text.holdout=0.995 holds out 79 of its 79"
    ):
        build_loader(load_config([*VAL, "data.sources.pydoc_text.holdout=0.995"]).data, tok, 64, 2, 0, 1, 0)

    gz = tmp_path / "one.jsonl.gz"
    write_jsonl(gz, range(40), random.Random(0), gz=True)
    one_gz = [
        *VAL,
        "~data.sources.pydoc_text",
        "data.sources.stdlib_code.kind=jsonl",
        f"data.sources.stdlib_code.path={gz}",
        "data.lanes=1",
    ]
    with pytest.raises(
        DataConfigError, match=r"data.sources.stdlib_code.holdout=0.02 holds out nothing.*convert it to JSON lines"
    ):
        build_loader(load_config(one_gz).data, tok, 64, 2, 0, 1, 0)

    # a held-out byte range in which no record starts: found when the validation rows are built
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"text": "x " * 5000}) + "\n" + json.dumps({"text": "the last line " * 300}) + "\n")
    cfg = load_config(
        [*one_gz[:-2], f"data.sources.stdlib_code.path={big}", "data.sources.stdlib_code.holdout=0.05", "data.lanes=1"]
    )
    loader = build_loader(cfg.data, tok, 64, 2, 0, 1, 0)
    with pytest.raises(
        DataConfigError, match=r"source 'stdlib_code' gives no validation rows.*data.sources.stdlib_code.holdout"
    ):
        build_validator(cfg, loader, HostBackend())

    cfg = load_config([*VAL, "++eval.sources={pydoc_text: {kind: builtin_text, domain: text}}"])
    with pytest.raises(ConfigError, match="eval.sources.pydoc_text.*name of a training source"):
        build_validator(cfg, build_loader(cfg.data, tok, 64, 2, 0, 1, 0), HostBackend())
    cfg = load_config([*VAL, "++eval.sources={code: {kind: builtin_text, domain: text}}"])
    with pytest.raises(ConfigError, match="eval.sources.code.*named like the domain 'code'"):
        build_validator(cfg, build_loader(cfg.data, tok, 64, 2, 0, 1, 0), HostBackend())


def test_a_short_held_out_slice_is_evaluated_whole_and_reported(tok, tmp_path):
    """eval.batches asks for more rows than the held-out lines (and a whole eval.sources file) hold: every held-out
    document is evaluated, each once, in lane order; the last row of a lane is padded; the log says how many rows."""
    path = tmp_path / "small.jsonl"
    write_jsonl(path, range(40), random.Random(2))
    cfg = load_config(
        [
            *VAL,
            "~data.sources.pydoc_text",
            "data.sources.stdlib_code.kind=jsonl",
            f"data.sources.stdlib_code.path={path}",
            "data.sources.stdlib_code.holdout=0.1",
            "data.lanes=3",
            "eval.batches=50",
            "++eval.sources={extra: {kind: jsonl, domain: text, path: " + str(path) + "}}",
        ]
    )
    loader = build_loader(cfg.data, tok, 64, 2, 0, 1, 0)
    said = []
    v = Validator(cfg, loader, HostBackend(), info=said.append)
    assert 0 < v.rows[0] < v.rows[1] < v.requested and v.names == ["stdlib_code", "extra"]
    assert any("'stdlib_code'" in line and f"only {v.rows[0]} of the {v.requested} rows" in line for line in said), said
    for s, src in enumerate(v.sources):
        expected = []
        for lane in range(3):
            for _, text, _ in src.records(0, lane, 3):
                expected += [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        got = []
        for b in v.batches:
            for r in range(b["input_ids"].shape[0]):
                if int(b["domain_ids"][r, 0]) == s:
                    ids, labels, pos = b["input_ids"][r], b["labels"][r], b["position_ids"][r]
                    real = ~((ids == 0) & (labels == -100))
                    got += ids[real].tolist()
                    # the training rows' rules: no loss on a document's BOS, positions restart there
                    bos = (ids == tok.bos_token_id) & real
                    assert (labels[real & ~bos] == ids[real & ~bos]).all() and (labels[bos] == -100).all()
                    assert (pos[bos] == 0).all() and ((pos[1:] == pos[:-1] + 1) | (pos[1:] == 0))[real[1:]].all()
        assert got == expected
    assert len(expected) > 40 * 10  # the whole file, through eval.sources


def _gloo_rank_failing_to_read(rank, size, port, out):
    import datetime
    import pickle

    import lemur_torch.data.heldout as heldout
    from lemur_torch.errors import DataReadError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 1:  # rank 1's first lane cannot be read (a remote file gone for good)

            def unreadable(*args, **kwargs):
                raise DataReadError("source 'stdlib_code': s3://bucket/code.jsonl: HTTP 403 after 8 retries")

            heldout.lane_rows = unreadable
        cfg = load_config(VAL)
        loader = build_loader(cfg.data, load_tokenizer("builtin"), 64, 2, rank, size, cfg.train.seed)
        try:
            Validator(cfg, loader, HostBackend(rank, size), info=lambda line: None)
            got = "built"
        except DataConfigError as exc:
            got = str(exc)
        with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
            pickle.dump(got, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_rank_that_cannot_read_its_validation_rows_stops_every_rank_with_its_error(tmp_path):
    import pickle
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _gloo_rank_failing_to_read, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    got = [pickle.load(open(tmp_path / f"{r}.pkl", "rb")) for r in range(2)]
    assert got[0] == got[1]  # the same error on every rank, none left waiting in a collective
    assert "validation" in got[0] and "DataReadError" in got[0] and "s3://bucket/code.jsonl: HTTP 403" in got[0]


def test_the_held_out_fraction_is_part_of_the_resume_identity(tok):
    cfg = load_config(VAL)
    a = build_loader(cfg.data, tok, 64, 2, 0, 1, 0)
    next(iter(a))
    other = load_config([*VAL, "data.sources.pydoc_text.holdout=0.2"])
    b = build_loader(other.data, tok, 64, 2, 0, 1, 0)
    with pytest.raises(DataConfigError, match="sources.pydoc_text.holdout"):
        b.load_state_dict(a.state_dict())


# -- cost at scale --------------------------------------------------------------------------------------------


def test_validation_reads_about_what_it_evaluates_at_many_lanes_and_ranks(tok, tmp_path):
    """A 6 MB JSON-lines source, 20% held out, 64 lanes: the validation rows read ~ the text they hold (not the
    1.2 MB slice, nor the 1 MB first read per lane training makes), nothing outside the slice; 8 simulated ranks
    together read what one reads; the number of micro-batches is the same on every rank of 512."""
    rng = random.Random(5)
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(6000):
            f.write(json.dumps({"text": f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(50, 300)))}) + "\n")
    size = path.stat().st_size
    base = [
        *VAL,
        "~data.sources.pydoc_text",
        "data.sources.stdlib_code.kind=jsonl",
        f"data.sources.stdlib_code.path={path}",
        "data.sources.stdlib_code.holdout=0.2",
        "data.lanes=64",
        "train.seq_len=256",
        "train.global_batch_tokens=8192",
        "train.micro_batch_size=4",
        "eval.batches=2",
    ]
    cfg = load_config(base)
    loader = build_loader(cfg.data, tok, 256, 4, 0, 1, 0)
    v = Validator(cfg, loader, HostBackend(), info=lambda line: None)
    assert v.rows == [v.requested] == [64]
    evaluated = sum(
        len(tok.decode(b["input_ids"][r]).encode())
        for b in v.batches
        for r in range(b["input_ids"].shape[0])
        if int(b["domain_ids"][r, 0]) == 0
    )
    held = math.ceil(size * 0.2)
    assert v.read_bytes[0] <= 2 * evaluated + 64 * 4096 < held / 2, (v.read_bytes, evaluated, held)
    quotas = [apportion(v.requested, v.sources[0].lane_weights(64))]
    per_rank = [rank_rows(loader, v.sources, quotas, r, 8) for r in range(8)]
    assert sum(p[3][0] for p in per_rank) == v.read_bytes[0]  # each lane read by one rank
    assert sorted(tuple(x.ravel()) for p in per_rank for x in p[0]) == sorted(
        tuple(x.ravel()) for x in rank_rows(loader, v.sources, quotas, 0, 1)[0]
    )
    counts = set()
    for r in (0, 1, 63, 64, 511):
        ld = build_loader(cfg.data, tok, 256, 4, r, 512, 0)
        ld.gather = lambda mine: [([1] * len(mine[0]), mine[1], None)]  # stands in for the other 511 ranks' counts
        counts.add(Validator(cfg, ld, HostBackend(r, 512), info=lambda line: None).micro_batches)
    assert counts == {1}
