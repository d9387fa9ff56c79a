"""Readers of every kind give the same documents; bad input is skipped, counted and reported with file:line;
config mistakes fail before training."""

import gzip
import json
import logging
import os
import shutil

import pytest
from omegaconf import OmegaConf

from lemur_torch.data import build_loader
from lemur_torch.data.schema import DataConfig, SourceConfig
from lemur_torch.data.sources import build_source
from lemur_torch.errors import BadInputError, DataConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "data", "bad_lines.jsonl")
# what each line of the fixture is (see the fixture): line -> reason; lines 1, 7, 10 are good documents
BAD_LINES = {
    2: "malformed_json",
    3: "missing_field",
    4: "empty",
    5: "undecodable",
    6: "empty",
    8: "empty",
    9: "missing_field",
}
GOOD_LINES = (1, 7, 10)


def cfg_of(sources, **kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": sources, **kw})


def src_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(SourceConfig), kw)


def good_docs():
    out = []
    with open(FIXTURE, "rb") as f:
        for i, line in enumerate(f, 1):
            if i in GOOD_LINES:
                out.append(json.loads(line)["text"])
    return out


def test_bad_lines_are_skipped_counted_and_reported_with_file_and_line(tok, caplog):
    # one row holds exactly the epoch's good documents, so after it every line has been passed exactly once
    epoch_tokens = sum(len(tok(d, add_special_tokens=False).input_ids) + 2 for d in good_docs())
    cfg = cfg_of(
        {"bad": {"kind": "jsonl", "domain": "code", "path": FIXTURE, "shuffle": False}}, lanes=1, log_bad_records=10
    )
    loader = build_loader(cfg, tok, epoch_tokens, 1, 0, 1, 0)
    with caplog.at_level(logging.WARNING, logger="lemur_torch.data"):
        batch = next(iter(loader))
    expected = []
    for d in good_docs():
        expected += [tok.bos_token_id] + tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert batch["input_ids"][0].tolist() == expected
    st = loader.stats()
    counts = {}
    for reason in BAD_LINES.values():
        counts[reason] = counts.get(reason, 0) + 1
    for reason, n in counts.items():
        assert st[f"skipped/bad/{reason}"] == n
    assert st["skipped/bad"] == len(BAD_LINES)
    text = caplog.text
    for line in BAD_LINES:
        assert f"bad_lines.jsonl:{line}:" in text
    for line in GOOD_LINES:
        assert f"bad_lines.jsonl:{line}:" not in text


def test_only_the_first_bad_records_are_logged_in_full(tok, caplog):
    cfg = cfg_of(
        {"bad": {"kind": "jsonl", "domain": "code", "path": FIXTURE, "shuffle": False}}, lanes=1, log_bad_records=2
    )
    with caplog.at_level(logging.WARNING, logger="lemur_torch.data"):
        next(iter(build_loader(cfg, tok, 64, 1, 0, 1, 0)))
    full = [r for r in caplog.records if "skipped bad record at" in r.getMessage()]
    assert (
        len(full) == 2 and "bad_lines.jsonl:2:" in full[0].getMessage() and "bad_lines.jsonl:3:" in full[1].getMessage()
    )


def test_strict_mode_raises_naming_file_and_line(tok):
    cfg = cfg_of({"bad": {"kind": "jsonl", "domain": "code", "path": FIXTURE}}, lanes=1, strict=True)
    with pytest.raises(BadInputError, match=r"bad_lines\.jsonl:2: malformed JSON"):
        next(iter(build_loader(cfg, tok, 64, 1, 0, 1, 0)))


@pytest.mark.parametrize(
    "source,match",
    [
        ({"kind": "jsonl", "path": "/no/such/file.jsonl"}, "does not exist"),
        ({"kind": "jsonl", "path": "/no/such/dir/*.jsonl"}, "matches no files"),
        ({"kind": "parquet", "path": None}, "needs a path"),
        ({"kind": "text", "path": "{tmp}"}, "holds no text files"),
        ({"kind": "jsonl", "path": FIXTURE, "weight": 0.0}, "weight must be positive"),
        ({"kind": "jsonl", "path": FIXTURE, "weight": -1.0}, "weight must be positive"),
        ({"kind": "csv", "path": FIXTURE}, "unknown kind 'csv'"),
        ({"kind": "hf", "path": "/no/such/hf_dataset"}, "does not exist"),
        ({"kind": "hf", "path": "{tmp}"}, "cannot open HF dataset"),
    ],
)
def test_config_mistakes_fail_before_training_naming_the_source(tok, tmp_path, source, match):
    source = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in source.items()}
    with pytest.raises(DataConfigError, match=match) as err:
        build_loader(cfg_of({"mysrc": {"domain": "code", **source}}, lanes=1), tok, 64, 1, 0, 1, 0)
    assert "'mysrc'" in str(err.value)


def test_more_lanes_than_documents_is_an_error(tok):
    # lanes whose byte range holds no line start: found when the lane first reads, naming the fix
    with pytest.raises((DataConfigError, BadInputError), match="lower data.lanes"):
        next(
            iter(
                build_loader(
                    cfg_of({"bad": {"kind": "jsonl", "domain": "code", "path": FIXTURE}}, lanes=16), tok, 64, 1, 0, 1, 0
                )
            )
        )
    # more lanes than bytes: some lanes get no share at all, refused when the loader is built
    with pytest.raises(DataConfigError, match="lower data.lanes"):
        build_loader(
            cfg_of({"bad": {"kind": "jsonl", "domain": "code", "path": FIXTURE}}, lanes=4096), tok, 64, 1, 0, 1, 0
        )


def docs_in_every_format(tmp_path, docs):
    """The same documents as jsonl, jsonl.gz (split over files), parquet (small row groups), a text tree and a
    local HF dataset folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = len(docs) // 2
    (tmp_path / "jl").mkdir()
    for name, part in (("a.jsonl", docs[:half]), ("b.jsonl.gz", docs[half:])):
        data = "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
        path = tmp_path / "jl" / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (tmp_path / "pq").mkdir()
    pq.write_table(
        pa.table({"text": docs[:half], "n": list(range(half))}), tmp_path / "pq" / "a.parquet", row_group_size=3
    )
    pq.write_table(
        pa.table({"text": docs[half:], "n": list(range(len(docs) - half))}),
        tmp_path / "pq" / "b.parquet",
        row_group_size=4,
    )
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (tmp_path / "tree" / "sub" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    (tmp_path / "hf").mkdir()
    shutil.copy(tmp_path / "jl" / "a.jsonl", tmp_path / "hf" / "part0.jsonl")
    with gzip.open(tmp_path / "jl" / "b.jsonl.gz", "rb") as f:
        (tmp_path / "hf" / "part1.jsonl").write_bytes(f.read())
    return {
        "jsonl": {"kind": "jsonl", "path": str(tmp_path / "jl" / "*")},
        "parquet": {"kind": "parquet", "path": str(tmp_path / "pq")},
        "text": {"kind": "text", "path": str(tmp_path / "tree")},
        "hf": {"kind": "hf", "path": str(tmp_path / "hf")},
    }


def some_docs():
    from pydoc_data.topics import topics

    return [topics[k][:1200] for k in sorted(topics)[:23]]


def test_every_kind_reads_the_same_documents(tok, tmp_path):
    docs = some_docs()
    kinds = docs_in_every_format(tmp_path, docs)
    ref = []
    while len(ref) < 60 * 128:
        for d in docs:
            ref += [tok.bos_token_id] + tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]
    for kind, sc in kinds.items():
        cfg = cfg_of({kind: {"domain": "text", "shuffle": False, **sc}}, lanes=1, read_chars=2000)
        rows = []
        for i, b in enumerate(build_loader(cfg, tok, 128, 4, 0, 1, 0)):
            rows += b["input_ids"].tolist()
            if i == 14:  # 60 rows: more than an epoch
                break
        assert [t for r in rows for t in r] == ref[: 60 * 128], kind


def lane_records(src, lanes, epoch=0):
    return [list(src.records(epoch, lane, lanes)) for lane in range(lanes)]


@pytest.mark.parametrize("lanes", [2, 3, 5])
def test_lanes_read_contiguous_disjoint_shares_of_every_kind(tmp_path, lanes):
    """File kinds: lane l reads a contiguous run of the documents (in file order, shuffle off), the lanes together
    read each document exactly once; one-document-per-file kinds: documents l, l+L, ..."""
    docs = [f"document number {i} " + "x" * (17 * i % 101) for i in range(23)]
    for kind, sc in docs_in_every_format(tmp_path, docs).items():
        src = build_source(kind, src_cfg(domain="text", shuffle=False, **sc), seed=0)
        shares = [[t for _, t, _ in recs] for recs in lane_records(src, lanes)]
        if kind == "text":
            assert shares == [docs[lane::lanes] for lane in range(lanes)], kind
            continue
        assert [t for share in shares for t in share] == docs, kind  # contiguous, in order, each exactly once
        assert all(shares), kind


def test_jsonl_shares_follow_the_input_split_rule(tmp_path):
    """One file, L lanes: lane l reads exactly the lines that start in bytes [l*W/L, (l+1)*W/L) (Hadoop/Spark
    input splits), whatever the line lengths; the reference is computed from the file's bytes here."""
    import random

    rng = random.Random(5)
    lines = [json.dumps({"text": f"doc {i} " + "y" * rng.randint(0, 400)}) + "\n" for i in range(300)]
    path = tmp_path / "one.jsonl"
    path.write_text("".join(lines))
    W = path.stat().st_size
    starts, off = [], 0
    for line in lines:
        starts.append(off)
        off += len(line.encode())
    for L in (1, 7, 64):
        src = build_source("one", src_cfg(kind="jsonl", domain="text", path=str(path), shuffle=False), seed=0)
        got = [[t for _, t, _ in recs] for recs in lane_records(src, L)]
        ref = [
            [json.loads(lines[i])["text"] for i, s0 in enumerate(starts) if ln * W // L <= s0 < (ln + 1) * W // L]
            for ln in range(L)
        ]
        assert got == ref, L


@pytest.mark.parametrize("lanes", [1, 3, 8])
def test_a_position_resumes_exactly_where_it_was_taken(tmp_path, lanes):
    """Seek, don't replay: reading from any record's position gives exactly the rest of the lane's share."""
    docs = [f"document number {i} " + "z" * (31 * i % 97) for i in range(41)]
    for kind, sc in docs_in_every_format(tmp_path, docs).items():
        src = build_source(
            kind, src_cfg(domain="text", **sc), seed=3
        )  # shuffled: positions hold across the permutation
        for epoch in (0, 1):
            for lane, full in enumerate(lane_records(src, lanes, epoch)):
                for i in range(1, len(full)):
                    assert list(src.records(epoch, lane, lanes, full[i - 1][2])) == full[i:], (kind, epoch, lane, i)


def test_parquet_lanes_inside_a_row_group_read_only_their_pages(tmp_path):
    """Fewer row groups than lanes: each lane's rows come from the data pages that hold them (a rewritten
    one-column file, parquet_pages.py); the rows must equal pyarrow's own reading of the whole file."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    texts = ["".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(1, 900))) for _ in range(2000)]
    texts[17] = None  # a null: counted as missing, in its place
    for i, kw in enumerate([{}, {"use_dictionary": False, "compression": "zstd", "data_page_version": "2.0"}]):
        path = tmp_path / f"t{i}.parquet"
        pq.write_table(
            pa.table({"id": list(range(2000)), "text": texts, "meta": [{"k": j} for j in range(2000)]}),
            path,
            row_group_size=700,
            data_page_size=8192,
            write_batch_size=16,
            dictionary_pagesize_limit=16384,
            **kw,
        )
        src = build_source("p", src_cfg(kind="parquet", domain="text", path=str(path), shuffle=False), seed=0)
        ref = pq.read_table(path, columns=["text"]).column(0).to_pylist()
        got = [rec for recs in lane_records(src, 13) for _, rec, _ in recs]
        assert [r if isinstance(r, str) else None for r in got] == [t if t and t.strip() else None for t in ref]


def test_shuffle_is_a_seeded_permutation_per_epoch():
    a = build_source("c", src_cfg(kind="builtin_code", domain="code"), seed=1)
    b = build_source("c", src_cfg(kind="builtin_code", domain="code"), seed=2)

    def locs(src, epoch):
        return [loc for loc, _, _ in src.records(epoch, 0, 1)]

    e0 = locs(a, 0)
    assert sorted(e0) == sorted(locs(a, 1)) == sorted(locs(b, 0))
    assert e0 != locs(a, 1) != locs(b, 0)
    assert e0 == locs(a, 0)


def test_undecodable_text_file_is_skipped_with_its_line(tok, tmp_path, caplog):
    (tmp_path / "a.txt").write_text("first document, fine\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"line one\nline two caf\xe9\n")
    (tmp_path / "c.txt").write_text("third document, fine\n", encoding="utf-8")
    cfg = cfg_of({"tree": {"kind": "text", "domain": "text", "path": str(tmp_path), "shuffle": False}}, lanes=1)
    loader = build_loader(cfg, tok, 16, 1, 0, 1, 0)
    with caplog.at_level(logging.WARNING, logger="lemur_torch.data"):
        batch = next(iter(loader))
    assert f"{tmp_path / 'b.txt'}:2:" in caplog.text
    assert loader.stats()["skipped/tree/undecodable"] == 1
    first = [tok.bos_token_id] + tok("first document, fine\n", add_special_tokens=False).input_ids + [tok.eos_token_id]
    third = [tok.bos_token_id] + tok("third document, fine\n", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert batch["input_ids"][0].tolist() == (first + third + first)[:16]


@pytest.mark.slow  # DataLoader workers: processes
def test_strict_mode_raises_through_dataloader_workers(tok):
    cfg = cfg_of({"bad": {"kind": "jsonl", "domain": "code", "path": FIXTURE}}, lanes=1, strict=True, num_workers=1)
    with pytest.raises(BadInputError, match=r"bad_lines\.jsonl:2"):
        next(iter(build_loader(cfg, tok, 64, 1, 0, 1, 0)))
