"""Sharding over ranks and workers, and exact resume across world-size changes.

Reference: one reader (1 rank, no workers), uninterrupted. Rank r of R takes global rows G0 + r + R*j for its
local rows j (the partition documented in loader.py); every other run must reassemble to the reference.
"""

import json
import os
import pickle
import signal
import sysconfig
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import children
from fakes import global_stream, rows_of, same
from omegaconf import OmegaConf

from lemur_torch.data import build_loader
from lemur_torch.data.resume import merge_states
from lemur_torch.data.schema import DataConfig
from lemur_torch.errors import DataConfigError
from lemur_torch.tokenizer import load_tokenizer

SEQ, B = 64, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real code (stdlib modules cut into ~1500-char pieces) and real text (pydoc topics), as jsonl."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("corpus")
    std = sysconfig.get_paths()["stdlib"]
    code = []
    for name in sorted(os.listdir(std))[:40]:
        if name.endswith(".py"):
            with open(os.path.join(std, name), encoding="utf-8") as f:
                src = f.read()
            code += [src[i : i + 1500] for i in range(0, min(len(src), 6000), 1500) if src[i : i + 1500].strip()]
    text = [topics[k][:3000] for k in sorted(topics)]
    for name, docs in (("code.jsonl", code), ("text.jsonl", text)):
        with open(d / name, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    return d


def make_cfg(corpus, **kw):
    sources = {
        "code": {"kind": "jsonl", "domain": "code", "weight": 10.0, "path": str(corpus / "code.jsonl")},
        "text": {"kind": "jsonl", "domain": "text", "weight": 1.0, "path": str(corpus / "text.jsonl")},
    }
    return OmegaConf.merge(
        OmegaConf.structured(DataConfig), {"sources": sources, "lanes": 12, "read_chars": 4000, **kw}
    )


def run(cfg, tok, rank, size, steps, state=None):
    loader = build_loader(cfg, tok, SEQ, B, rank, size, seed=7)
    if state is not None:
        loader.load_state_dict(state)
    rows = []
    for i, batch in enumerate(loader):
        rows += rows_of(batch)
        if i + 1 == steps:
            break
    return loader, rows


@pytest.fixture(scope="module")
def reference(corpus, tok):
    _, rows = run(make_cfg(corpus), tok, 0, 1, 60)
    return rows  # 120 global rows


@pytest.mark.slow
def test_two_ranks_two_workers_partition_the_single_reader_stream(corpus, tok, reference):
    cfg = make_cfg(corpus, num_workers=2)
    per_rank = [run(cfg, tok, r, 2, 15)[1] for r in range(2)]
    stream = global_stream(per_rank)
    assert same(stream, reference[: len(stream)])
    # disjoint shares: no row (as content) is delivered twice, and the union is exactly the reference prefix
    keys = [tuple(r.flatten().tolist()) for rows in per_rank for r in rows]
    assert len(set(keys)) == len(keys) == 60
    assert set(keys) == {tuple(r.flatten().tolist()) for r in reference[:60]}


@pytest.mark.parametrize(
    "before,after,workers_before,workers_after",
    [  # DataLoader workers are processes
        pytest.param(2, 1, 0, 2, marks=pytest.mark.slow),
        pytest.param(1, 3, 2, 0, marks=pytest.mark.slow),
        (3, 5, 0, 0),
    ],
)
def test_resume_on_a_different_number_of_ranks(corpus, tok, reference, before, after, workers_before, workers_after):
    # 5 ranks do not divide 12 lanes: lanes are shared and each reader drops rows it does not own (still exact)
    n1, n2 = 4, 5
    loaders, first = [], []
    for r in range(before):
        ld, rows = run(make_cfg(corpus, num_workers=workers_before), tok, r, before, n1)
        loaders.append(ld)
        first.append(rows)
    state = merge_states([ld.local_state_dict() for ld in loaders])
    state = pickle.loads(pickle.dumps(state))
    assert state["rows"] == n1 * B * before
    second = [run(make_cfg(corpus, num_workers=workers_after), tok, r, after, n2, state)[1] for r in range(after)]
    stream = global_stream(first) + global_stream(second, start=state["rows"])
    assert same(stream, reference[: len(stream)])


def test_state_is_checked_on_load(corpus, tok):
    cfg = make_cfg(corpus)
    lds = [run(cfg, tok, r, 2, 3)[0] for r in range(2)]
    fresh = build_loader(cfg, tok, SEQ, B, 0, 1, seed=7)
    with pytest.raises(DataConfigError, match="inconsistent"):
        fresh.load_state_dict(lds[0].local_state_dict())  # one rank's view only: rank 1's lanes are missing
    other = build_loader(make_cfg(corpus, lanes=6), tok, SEQ, B, 0, 1, seed=7)
    with pytest.raises(DataConfigError, match="lanes"):
        other.load_state_dict(merge_states([ld.local_state_dict() for ld in lds]))


def test_stats_report_realised_ratio(corpus, tok):
    loader, rows = run(make_cfg(corpus), tok, 0, 1, 33)  # 66 rows = 6 periods of 11
    st = loader.stats()
    n_code = sum(int(r[3, 0] == 0) for r in rows)
    assert n_code == 60
    assert st["token_frac/code"] == pytest.approx(n_code / len(rows))
    assert st["tokens"] == len(rows) * SEQ


def _gloo_worker(rank, size, corpus, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["_LT_PORT"], OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        tok = load_tokenizer("builtin")
        loader, rows = run(make_cfg(corpus, num_workers=1), tok, rank, size, 3)
        local = loader.local_state_dict()
        state = loader.state_dict()  # a collective: every rank calls it, as the checkpointer does
        with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
            pickle.dump({"state": state, "local": local, "rows": rows}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_state_dict_under_gloo_is_identical_on_every_rank_and_resumes(corpus, tok, reference, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["_LT_PORT"] = str(s.getsockname()[1])
    # fork: the children inherit the imported torch and tokenizer (spawn would re-import them: slow on 2 cores)
    mp.start_processes(_gloo_worker, args=(2, corpus, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = [pickle.load(open(tmp_path / f"{r}.pkl", "rb")) for r in range(2)]
    assert got[0]["state"] == got[1]["state"] == merge_states([g["local"] for g in got])
    # iterating exchanged nothing: each rank holds the positions of its own lanes only
    assert set(got[0]["local"]["lane_states"]).isdisjoint(got[1]["local"]["lane_states"])
    assert got[0]["state"]["rows"] == 3 * B * 2
    _, rest = run(make_cfg(corpus), tok, 0, 1, 4, got[0]["state"])
    stream = global_stream([g["rows"] for g in got]) + rest
    assert same(stream, reference[: len(stream)])


@pytest.mark.slow
def test_workers_ignore_stop_signals(corpus, tok, reference):
    """Slurm and torchrun signal every process of a job, DataLoader workers included: the workers live on (the
    trainer owns the shutdown), and the stream goes on exactly, where a killed worker would make it raise."""
    before = set(children(os.getpid()))
    loader = build_loader(make_cfg(corpus, num_workers=2), tok, SEQ, B, 0, 1, seed=7)
    batches = iter(loader)
    rows = rows_of(next(batches))
    workers = set(children(os.getpid())) - before
    assert len(workers) == 2, workers
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        for pid in workers:
            os.kill(pid, sig)
    time.sleep(1.0)  # a worker that died of it is reaped by now, and the next batch would raise
    for _ in range(9):
        rows += rows_of(next(batches))
    assert set(children(os.getpid())) - before == workers
    assert same(rows, reference[: len(rows)])
    del batches  # the DataLoader ends its workers (its own shutdown, not a signal)
    deadline = time.monotonic() + 30
    while set(children(os.getpid())) & workers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(children(os.getpid())) & workers


@pytest.mark.parametrize("prefetch_threads,read_chars", [(0, 4000), (1, 100), (0, 1 << 16)])
def test_stream_does_not_depend_on_read_ahead_or_batching(corpus, tok, reference, prefetch_threads, read_chars):
    # how many records a read takes and which packers share a tokenizer call must not change a single token
    _, rows = run(make_cfg(corpus, prefetch_threads=prefetch_threads, read_chars=read_chars), tok, 0, 1, 20)
    assert same(rows, reference[: len(rows)])


def test_memory_does_not_grow_with_the_corpus(tok, tmp_path):
    """Streaming: the same number of tokens from an 8x larger corpus needs about the same peak memory."""
    import tracemalloc
    from pydoc_data.topics import topics

    base = [topics[k] for k in sorted(topics)]
    peaks = {}
    for copies in (2, 16):
        path = tmp_path / f"corpus{copies}.jsonl"
        with open(path, "w") as f:
            for c in range(copies):
                f.writelines(json.dumps({"text": f"[copy {c}] {t}"}) + "\n" for t in base)
        cfg = OmegaConf.merge(
            OmegaConf.structured(DataConfig),
            {"sources": {"t": {"kind": "jsonl", "domain": "text", "path": str(path)}}, "lanes": 2, "read_chars": 65536},
        )
        tracemalloc.start()
        for i, _ in enumerate(build_loader(cfg, tok, 512, 4, 0, 1, 0)):
            if i == 150:  # 300k tokens: a good part of the small corpus, a small part of the big one
                break
        peaks[copies] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert os.path.getsize(tmp_path / "corpus16.jsonl") > 7e6  # more than twice the peak memory of a run
    assert peaks[16] < 1.25 * peaks[2] + 5e5, peaks
