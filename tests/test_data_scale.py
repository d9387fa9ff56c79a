"""Costs that must not grow with scale: bytes read per lane count, resume time per position in the corpus, and the
resume identity (a changed data setting is refused by name; data.resume_stream=restart starts the new stream)."""

import json
import os
import random
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_servers import CountingFS
from omegaconf import OmegaConf

from lemur_torch.data import build_loader
from lemur_torch.data.schema import DataConfig, SourceConfig
from lemur_torch.data.sources import build_source
from lemur_torch.errors import DataConfigError
from lemur_torch.tokenizer import build_tokenizer

WORDS = [w for w in open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read().split() if w.isalpha()]


def texts(n, seed, lo=200, hi=2000):
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(lo, hi) // 6)) for i in range(n)]


def src_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(SourceConfig), kw)


def read_all_lanes(src, lanes):
    n = 0
    for lane in range(lanes):
        for _ in src.records(0, lane, lanes):
            n += 1
    return n


def test_one_reader_of_64_lanes_reads_each_byte_about_once(tmp_path):
    """A one-file JSON-lines source and a one-file parquet source with 4 row groups, 64 lanes read by one reader:
    bytes read from storage (a counting filesystem) / bytes of the records <= 1.2. The stride design read every
    byte once per lane (x64)."""
    docs = texts(12000, 0)
    jl = tmp_path / "one.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = build_source("jl", src_cfg(kind="jsonl", domain="text", path=f"counting://{jl}"), seed=0)
    CountingFS.reset()
    assert read_all_lanes(src, 64) == len(docs)
    assert CountingFS.read_bytes / jl.stat().st_size <= 1.2, CountingFS.read_bytes / jl.stat().st_size

    # the same check with the kernel's count of bytes read by this process (local path, no wrapper)
    src = build_source("jl", src_cfg(kind="jsonl", domain="text", path=str(jl)), seed=0)
    with open("/proc/self/io") as f:
        before = int(next(line for line in f if line.startswith("rchar")).split()[1])
    read_all_lanes(src, 64)
    with open("/proc/self/io") as f:
        after = int(next(line for line in f if line.startswith("rchar")).split()[1])
    assert (after - before) / jl.stat().st_size <= 1.2

    # parquet: a writer's defaults scaled down with the file (pages, dictionary limit); fewer row groups than
    # lanes, so lanes share row groups and read only their pages
    pqf = tmp_path / "one.parquet"
    pq.write_table(
        pa.table({"id": list(range(len(docs))), "text": docs}),
        pqf,
        row_group_size=3000,
        data_page_size=8192,
        write_batch_size=8,
        dictionary_pagesize_limit=8192,
    )
    meta = pq.read_metadata(pqf)
    assert meta.num_row_groups == 4
    text_bytes = sum(meta.row_group(g).column(1).total_compressed_size for g in range(4))
    src = build_source("pq", src_cfg(kind="parquet", domain="text", path=f"counting://{pqf}"), seed=0)
    CountingFS.reset()
    assert read_all_lanes(src, 64) == len(docs)
    assert CountingFS.read_bytes / text_bytes <= 1.2, CountingFS.read_bytes / text_bytes


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """~200 MB of JSON lines, written from a pool of distinct lines (fast to make)."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    pool = [json.dumps({"text": t}) + "\n" for t in texts(2000, 1, 500, 3000)]
    block = "".join(pool).encode()
    with open(path, "wb") as f:
        for _i in range(200_000_000 // len(block) + 1):
            f.write(block)
    return path, block


def test_resume_near_the_end_of_a_200mb_corpus_costs_what_a_start_costs(tok, big_corpus):
    path, block = big_corpus
    size = path.stat().st_size
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "sources": {"big": {"kind": "jsonl", "domain": "text", "path": str(path), "shuffle": False}},
            "lanes": 4,
            "read_chars": 65536,
            "prefetch_threads": 0,
        },
    )

    def first_batch(state=None):
        t0 = time.perf_counter()
        loader = build_loader(cfg, tok, 128, 4, 0, 1, 0)
        if state is not None:
            loader.load_state_dict(state)
        batch = next(iter(loader))
        return time.perf_counter() - t0, loader, batch

    _, loader, _ = first_batch()
    state = loader.state_dict()
    # move every lane to a line start at ~90% of its quarter of the file: the reader position the loader would
    # hold there (sources.py: (segment, byte offset, line number or 0 if unknown))
    expected = {}
    with open(path, "rb") as f:
        for lane, ls in state["lane_states"].items():
            lo = lane * size // 4
            f.seek(lo + int(0.9 * size / 4))
            f.readline()
            off = f.tell()
            ls["src"]["big"].update(pos=(0, off, 0), offset=0)
            expected[lane] = json.loads(f.readline())["text"]
    times = {"start": [], "resume": []}
    for _ in range(3):  # alternate: a busy neighbour slows both alike
        times["start"].append(first_batch()[0])
        dt, resumed, batch = first_batch(state)
        times["resume"].append(dt)
    # the resumed rows continue at exactly those documents (row 4 = lane 0's next row, from its document)
    want = [tok.bos_token_id] + tok(expected[0], add_special_tokens=False).input_ids
    assert batch["input_ids"][0].tolist()[: len(want)] == want[:128]
    at_start = sum(ls["src"]["big"]["io"]["bytes"] for ls in state["lane_states"].values())
    read = resumed.stats()["read_bytes/big"] - at_start  # the state's counters carry over; count the new reads
    assert min(times["resume"]) <= 2 * min(times["start"]), times
    # what it read: a block per lane near 90%, as much as a start reads, not the 180 MB before them
    assert read <= 2 * at_start and read < 0.05 * size, (read, at_start)


def make_cfg(tmp_path, **kw):
    docs = texts(400, 2)
    for name in ("a.jsonl", "b.jsonl"):
        p = tmp_path / name
        if not p.exists():
            p.write_text("".join(json.dumps({"text": d, "body": d[::-1]}) + "\n" for d in docs))
    sources = {"a": {"kind": "jsonl", "domain": "text", "path": str(tmp_path / "a.jsonl")}}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"sources": sources, "lanes": 4, "read_chars": 4000, **kw})


@pytest.mark.parametrize(
    "change,key",
    [
        ({"sources": {"a": {"path": "{tmp}/b.jsonl"}}}, "sources.a.path"),
        ({"sources": {"a": {"text_field": "body"}}}, "sources.a.text_field"),
        ({"sources": {"a": {"shuffle": False}}}, "sources.a.shuffle"),
        ("tokenizer", "tokenizer"),
    ],
)
def test_a_changed_data_setting_refuses_to_resume_by_name_and_restart_starts_the_new_stream(tmp_path, tok, change, key):
    first = build_loader(make_cfg(tmp_path), tok, 64, 2, 0, 1, 0)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    other_tok = tok
    if change == "tokenizer":
        other_tok = build_tokenizer(OmegaConf.create({"tokenizer": "builtin", "format": "chat"}))  # + ChatML tokens
        cfg = make_cfg(tmp_path)
    else:
        change = json.loads(json.dumps(change).replace("{tmp}", str(tmp_path)))
        cfg = OmegaConf.merge(make_cfg(tmp_path), change)
    second = build_loader(cfg, other_tok, 64, 2, 0, 1, 0)
    with pytest.raises(DataConfigError) as err:
        second.load_state_dict(state)
    assert f"{key}=" in str(err.value) and "resume_stream=restart" in str(err.value) and "\n" not in str(err.value)
    cfg.resume_stream = "restart"
    restarted = build_loader(cfg, other_tok, 64, 2, 0, 1, 0)
    restarted.load_state_dict(state)
    fresh = build_loader(cfg, other_tok, 64, 2, 0, 1, 0)
    assert next(iter(restarted))["input_ids"].tolist() == next(iter(fresh))["input_ids"].tolist()


def test_a_state_of_the_stride_design_is_refused_with_what_to_do(tmp_path, tok):
    loader = build_loader(make_cfg(tmp_path), tok, 64, 2, 0, 1, 0)
    old = {**loader.state_dict(), "version": 1}
    with pytest.raises(DataConfigError, match="version 1.*resume_stream=restart"):
        loader.load_state_dict(old)


@pytest.mark.slow
def test_training_refuses_a_changed_source_with_exit_2_and_restart_continues_the_model(tmp_path):
    from conftest import FAST, run_train

    run_dir = str(tmp_path / "run")
    base = [*FAST, f"run_dir={run_dir}", "train.max_steps=4", "checkpoint.every_steps=2"]
    run_train([*base, "train.stop_at_step=2"])
    changed = [*base, "data.sources.pydoc_text.shuffle=false"]
    proc = run_train(changed, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "sources.pydoc_text.shuffle=" in err[0] and "resume_stream=restart" in err[0], err
    proc = run_train([*changed, "data.resume_stream=restart"])
    assert "resumed from" in proc.stdout + proc.stderr and "step 2" in proc.stdout + proc.stderr
    assert "data.resume_stream=restart" in proc.stderr
    extra = __import__("torch").load(
        os.path.join(run_dir, "checkpoints", "step_00000004", "extra_state.pt"), weights_only=False
    )
    assert extra["trainer"]["step"] == 4 and extra["loader"]["rows"] == 2 * 4  # the new stream: 2 steps of 4 rows
