"""Chat batches through the pipeline's lanes and resume: rows of whole conversations, packed or padded, mixed by
weight, bad records skipped with their line (or strict errors), and exact resume on another number of ranks.

References are computed here: each conversation's text is written out with an f-string, and rows are checked
by decoding their segments (split where position_ids restart) back to those texts.
"""

import json
import logging
import pickle

import pytest
import torch
from fakes import global_stream, rows_of, same
from omegaconf import OmegaConf

from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.data import loader as loader_module
from lemur_torch.data.resume import merge_states
from lemur_torch.data.schema import DataConfig
from lemur_torch.data.stream import ignore_stop_signals
from lemur_torch.errors import BadInputError, DataConfigError
from lemur_torch.tokenizer import build_tokenizer, load_tokenizer

SEQ, B, PAD = 96, 2, 32000


def conversation(i):
    turns = [("user", f"Question {i}: what is {i} squared?"), ("assistant", f"{i} squared is {i * i}.")]
    if i % 3 == 0:
        turns += [("user", "And cubed?"), ("assistant", f"{i} cubed is {i**3}. " + "Indeed. " * (i % 7))]
    if i % 4 == 1:
        turns.insert(0, ("system", "You do arithmetic."))
    return turns


def text_of(turns):
    return "<s>" + "".join(f"<|im_start|>{r}\n{c.strip()}<|im_end|>\n" for r, c in turns)


def answers_of(turns):
    return "".join(f"{c.strip()}<|im_end|>\n" for r, c in turns if r == "assistant")


N = 60
TEXTS = {text_of(conversation(i)): i for i in range(N)}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(OmegaConf.create({"tokenizer": "builtin", "format": "chat"}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chats")
    with open(d / "arith.jsonl", "w") as f:  # OpenAI messages form
        for i in range(N):
            f.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in conversation(i)]}) + "\n")
    with open(d / "arith_sharegpt.jsonl", "w") as f:  # the same conversations in ShareGPT form
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        for i in range(N):
            f.write(json.dumps({"conversations": [{"from": names[r], "value": c} for r, c in conversation(i)]}) + "\n")
    return d


def make_cfg(files, sources=None, **kw):
    sources = sources or {
        "arith": {"kind": "jsonl", "domain": "text", "path": str(files / "arith.jsonl"), "shuffle": False}
    }
    base = {"format": "chat", "sources": sources, "lanes": 6, "read_chars": 500, **kw}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), base)


def run(cfg, tok, rank, size, steps, state=None, seq=SEQ):
    loader = build_loader(cfg, tok, seq, B, rank, size, seed=3)
    if state is not None:
        loader.load_state_dict(state)
    rows = []
    for i, batch in enumerate(loader):
        assert all(v.shape == (B, seq) for v in batch.values() if torch.is_tensor(v))
        rows += rows_of(batch)
        if i + 1 == steps:
            break
    return loader, rows


def segments(tok, row):
    """(conversation index or None for padding, length) per segment of a row, checking each segment's labels."""
    ids, labels, pos = row[0].tolist(), row[1].tolist(), row[2].tolist()
    starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
    out = []
    for a, b in zip(starts, starts[1:]):
        seg_ids, seg_labels = ids[a:b], labels[a:b]
        assert pos[a:b] == list(range(b - a))
        if set(seg_ids) == {PAD}:
            assert set(seg_labels) == {-100}
            out.append((None, b - a))
            continue
        text = tok.decode(seg_ids)
        assert text in TEXTS, text  # a whole conversation, never a piece of one
        i = TEXTS[text]
        assert tok.decode([x for x, y in zip(seg_ids, seg_labels) if y != -100]) == answers_of(conversation(i))
        assert [y for x, y in zip(seg_ids, seg_labels) if y != -100] == [
            x for x, y in zip(seg_ids, seg_labels) if y != -100
        ]
        out.append((i, b - a))
    return out


def test_packed_rows_hold_whole_conversations_in_order(files, tok):
    loader, rows = run(make_cfg(files, lanes=1), tok, 0, 1, 10)
    order, lengths = [], {}
    for row in rows:
        segs = segments(tok, row)
        convs = [i for i, _ in segs if i is not None]
        assert convs and all(i is None for i, _ in segs[len(convs) :])  # padding only at the end
        order += convs
        lengths.update({i: n for i, n in segs if i is not None})
    assert order == [k % N for k in range(len(order))]  # lanes=1, no shuffle: the file order, epoch after epoch
    # greedy packing: a row is closed only when the next conversation does not fit in its padding
    for row, nxt in zip(rows, rows[1:]):
        pad = sum(n for i, n in segments(tok, row) if i is None)
        assert lengths[segments(tok, nxt)[0][0]] > pad
    assert loader.stats()["conversations"] == len(order)
    assert loader.stats()["conversations_per_row"] == pytest.approx(len(order) / len(rows))


def test_padded_rows_hold_one_conversation(files, tok):
    _, rows = run(make_cfg(files, lanes=1, chat_packing="padded"), tok, 0, 1, 5)
    order = []
    for row in rows:
        segs = segments(tok, row)
        assert segs[0][0] is not None and all(i is None for i, _ in segs[1:])
        order.append(segs[0][0])
    assert order == list(range(len(rows)))


def test_attend_across_documents_keeps_tokens_and_labels(files, tok):
    _, rows = run(make_cfg(files, lanes=1), tok, 0, 1, 3)
    _, flat = run(make_cfg(files, lanes=1, attend_across_documents=True), tok, 0, 1, 3)
    for a, b in zip(rows, flat):
        assert torch.equal(a[:2], b[:2]) and b[2].tolist() == list(range(SEQ))


def test_sources_mixed_by_weight_with_their_domains(files, tok):
    sources = {
        "openai": {"kind": "jsonl", "domain": "text", "weight": 3.0, "path": str(files / "arith.jsonl")},
        "sharegpt": {"kind": "jsonl", "domain": "code", "weight": 1.0, "path": str(files / "arith_sharegpt.jsonl")},
    }
    loader, rows = run(make_cfg(files, sources), tok, 0, 1, 12)  # 24 rows = 6 periods of 4
    assert loader.domain_names == ["code", "text"]
    doms = [int(r[3, 0]) for r in rows]
    assert all(len(set(r[3].tolist())) == 1 for r in rows)
    assert doms.count(1) == 18 and doms.count(0) == 6
    for row in rows:
        segments(tok, row)  # both formats give the same texts


@pytest.fixture(scope="module")
def reference(files, tok):
    return run(make_cfg(files), tok, 0, 1, 24)[1]


@pytest.mark.slow  # seconds; with workers, processes
@pytest.mark.parametrize("before,after,workers", [(2, 3, 0), (3, 1, 2)])
def test_resume_on_a_different_number_of_ranks_continues_the_conversation_order(
    files, tok, reference, before, after, workers
):
    n1, n2 = 3, 4
    first, loaders = [], []
    for r in range(before):
        ld, rows = run(make_cfg(files, num_workers=workers), tok, r, before, n1)
        loaders.append(ld)
        first.append(rows)
    state = pickle.loads(pickle.dumps(merge_states([ld.local_state_dict() for ld in loaders])))
    assert state["rows"] == n1 * B * before and state["format"] == "chat"
    positions = [st for ls in state["lane_states"].values() for st in ls["src"].values()]
    assert all(st["epoch"] == 0 and st["pos"] is not None for st in positions), positions  # every lane mid-epoch
    second = [run(make_cfg(files), tok, r, after, n2, state)[1] for r in range(after)]
    stream = global_stream(first) + global_stream(second, start=state["rows"])
    assert same(stream, reference[: len(stream)])
    convs = [i for row in stream for i, _ in segments(tok, row) if i is not None]
    assert convs == [i for row in reference[: len(stream)] for i, _ in segments(tok, row) if i is not None]
    with pytest.raises(DataConfigError, match="chat_packing"):
        build_loader(make_cfg(files, chat_packing="padded"), tok, SEQ, B, 0, 1, seed=3).load_state_dict(state)


BAD_LINES = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    "not json {",
    {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "?"},
        ]
    },
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
    {"conversations": [{"from": "human", "value": "long " * 200}, {"from": "gpt", "value": "short"}]},
    {"instruction": "Say ok.", "output": "ok"},
]


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("bad") / "bad.jsonl"
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in BAD_LINES))
    return p


def test_bad_conversations_are_skipped_and_counted_with_their_line(bad_file, tok, caplog):
    cfg = make_cfg(None, {"bad": {"kind": "jsonl", "domain": "text", "path": str(bad_file), "shuffle": False}}, lanes=1)
    with caplog.at_level(logging.WARNING, logger="lemur_torch.data"):
        loader, rows = run(cfg, tok, 0, 1, 2, seq=64)
    st = loader.stats()
    for reason in (
        "malformed_json",
        "unknown_role",
        "not_ending_with_assistant",
        "empty_turn",
        "wrong_type",
        "no_trainable_tokens",
    ):
        assert st[f"skipped/bad/{reason}"] >= 1, (reason, st)
    logged = {
        line.split("bad.jsonl:")[1].split(":")[0]: line for line in caplog.text.splitlines() if "bad.jsonl:" in line
    }
    for line, what in (
        (2, "malformed JSON"),
        (3, "unknown role 'robot'"),
        (4, "not 'assistant'"),
        (5, "empty assistant turn"),
        (6, "must be strings"),
    ):
        assert what in logged[str(line)], (line, logged)
    assert "7" not in logged  # too long for seq_len is not bad input: counted, not warned


def test_strict_mode_stops_at_the_first_bad_line(bad_file, tok):
    cfg = make_cfg(
        None,
        {"bad": {"kind": "jsonl", "domain": "text", "path": str(bad_file), "shuffle": False}},
        lanes=1,
        strict=True,
    )
    with pytest.raises(BadInputError, match=r"bad\.jsonl:2: malformed JSON"):
        run(cfg, tok, 0, 1, 2, seq=64)


def test_chat_needs_the_chat_tokenizer_and_chat_kinds(files):
    with pytest.raises(DataConfigError, match="build_tokenizer"):
        build_loader(make_cfg(files), load_tokenizer("builtin"), SEQ, B, 0, 1, seed=3)
    tok = build_tokenizer(OmegaConf.create({"tokenizer": "builtin", "format": "chat"}))
    with pytest.raises(DataConfigError, match="does not hold conversations"):
        build_loader(make_cfg(files, {"x": {"kind": "builtin_code", "domain": "code"}}), tok, SEQ, B, 0, 1, seed=3)
    with pytest.raises(DataConfigError, match="builtin_chat needs path"):
        build_loader(
            make_cfg(files, {"x": {"kind": "builtin_chat", "domain": "code", "path": "nope"}}),
            tok,
            SEQ,
            B,
            0,
            1,
            seed=3,
        )
    with pytest.raises(DataConfigError, match="chat_packing"):
        build_loader(make_cfg(files, chat_packing="ragged"), tok, SEQ, B, 0, 1, seed=3)


def test_builtin_conversation_sets(tok):
    from lemur_torch.data.chat_sources import pydoc_conversations, stdlib_function_conversations

    pydoc, funcs = pydoc_conversations(), stdlib_function_conversations()
    assert len(pydoc) > 60 and len(funcs) > 200
    loc, turns = next((loc, t) for loc, t in funcs if "textwrap.py" in loc and "def dedent(" in t[-1][1])
    assert (
        turns[0][0] == "system"
        and "`dedent(text)`" in turns[1][1]
        and turns[2][1].startswith("```python\ndef dedent(text):")
    )
    cfg = load_config(["data=sample_chat"]).data
    loader, rows = run(cfg, tok, 0, 1, 3, seq=256)
    assert loader.domain_names == ["code", "text"] and all((r[1] != -100).any() for r in rows)


def test_hf_datasets_sources_with_renamed_fields(tmp_path, tok):
    """kind hf (datasets, streaming) on local files: OpenOrca-style jsonl read as alpaca with renamed fields, and a
    ShareGPT dump that is one JSON array."""
    orca = [
        {
            "id": str(i),
            "system_prompt": "Be exact." if i % 2 else "",
            "question": f"Double {i}?",
            "response": f"{2 * i}.",
        }
        for i in range(8)
    ]
    (tmp_path / "orca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in orca))
    share = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": f"Halve {2 * i}?"}, {"from": "gpt", "value": f"{i}."}],
        }
        for i in range(8)
    ]
    (tmp_path / "share.json").write_text(json.dumps(share))
    sources = {
        "orca": {
            "kind": "hf",
            "domain": "openorca",
            "path": "json",
            "data_files": str(tmp_path / "orca.jsonl"),
            "chat_format": "alpaca",
            "fields": {"system": "system_prompt", "instruction": "question", "output": "response"},
        },
        "share": {
            "kind": "hf",
            "domain": "sharegpt",
            "path": "json",
            "data_files": str(tmp_path / "share.json"),
            "chat_format": "sharegpt",
        },
    }
    expected = {
        text_of(
            ([("system", "Be exact.")] if i % 2 else []) + [("user", f"Double {i}?"), ("assistant", f"{2 * i}.")]
        ): ("orca", i)
        for i in range(8)
    }
    expected.update({text_of([("user", f"Halve {2 * i}?"), ("assistant", f"{i}.")]): ("share", i) for i in range(8)})
    loader, rows = run(make_cfg(None, sources, lanes=1, chat_packing="padded"), tok, 0, 1, 8, seq=48)
    seen = []
    for row in rows:
        ids = row[0][row[0] != PAD].tolist()
        seen.append(expected[tok.decode(ids)])
        assert loader.domain_names[int(row[3, 0])] == {"orca": "openorca", "share": "sharegpt"}[seen[-1][0]]
    assert sorted(seen) == sorted(expected.values())  # one padded row each: 16 rows = one epoch of both


def test_chat_workers_ignore_stop_signals(files, tok, monkeypatch):
    """The chat loader reads through the packed mixture loader's DataLoader, whose workers ignore the signals that
    stop a run (tests/test_data_loader.py sends them to real workers)."""
    made = {}

    class Made(Exception):
        pass

    def data_loader(dataset, **kwargs):
        made.update(kwargs)
        raise Made  # no processes: what the loader asked for is the point

    monkeypatch.setattr(loader_module, "DataLoader", data_loader)
    loader = build_loader(make_cfg(files, num_workers=2), tok, SEQ, B, 0, 1, seed=3)
    assert type(loader).__name__ == "ChatLoader"
    with pytest.raises(Made):
        next(iter(loader))
    assert made["num_workers"] == 2 and made["worker_init_fn"] is ignore_stop_signals, made
