"""Data pipeline throughput on the built-in corpus: lemur-torch's streaming mixture vs the raw tokenizer and
vs the usual HF recipe.

Three sides, each in its own fresh process (so the tokenizer's word cache and the peak RSS are its own):
  pipeline  build_loader(conf/data/sample.yaml) -> micro-batches [B, S]: read -> mix -> tokenize -> pack -> batch;
            timed from building the loader (file reading included) to the last batch.
Both wall-clock tokens/s and tokens per CPU-second (all threads) are reported.
  raw       the limit: the same documents already in memory, tokenized by the fast tokenizer's batch call
            (`backend_tokenizer.encode_batch_fast`, no special tokens, no offsets) in one batch per 512 documents;
            timed around the tokenizer calls only. Also reported: the transformers call `tok(texts)`.
  hf        transformers' run_clm.py recipe: `datasets.Dataset.from_dict(texts).map(tokenize, batched=True)`
            then `.map(group_texts, batched=True)` into blocks of S; timed from `from_dict` to the last block.
The raw and hf sides get the corpus the pipeline reads at 10:1: every stdlib .py file plus the pydoc topics
repeated until text is 1/11 of the tokens, all of it --passes times (several passes amortise the pipeline's
read-ahead, as in a real run). Each side counts the tokens it produced; the pipeline is run to the raw side's
token count. The sides alternate for --rounds rounds (the machine may be shared); ratios use medians.
Prints tokens/s, ratios and peak RSS; writes bench/results/data_pipeline.json.
Scale section (`scale_section`): read amplification at 1, 64 and 1024 lanes on one ~100 MB JSON-lines file, and
the time to the first batch when resuming at 10% and 90% of it, beside the stride design's figures.

    python bench/data_pipeline.py [--seq-len 2048] [--batch 8] [--workers 0] [--passes 2] [--rounds 3] [--smoke]

`--smoke` (seconds): 20 code files, rows of 2 x 128 tokens, one pass, one round, a 1 MB scale file at 1 and 8
lanes; written to data_pipeline.smoke.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pydoc_data.topics import topics

from omegaconf import OmegaConf
from results_io import write_result  # bench/ is on sys.path: this script's folder

from lemur_torch.data import build_loader
from lemur_torch.data.schema import DataConfig, SourceConfig
from lemur_torch.data.sources import build_source, builtin_code_files
from lemur_torch.data.storage import Storage, io_counters
from lemur_torch.tokenizer import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def corpus(tok, max_docs: int = 0):
    """Texts in the 10:1 code:text token mix, and their token count (counted with the raw tokenizer); the first
    `max_docs` code files and a tenth as many topics if given."""
    code = []
    for path in builtin_code_files():
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            code.append(text)
    text = [topics[k] for k in sorted(topics) if topics[k].strip()]
    if max_docs:
        code, text = code[:max_docs], text[: max(1, max_docs // 10)]
    return code, text


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_raw(args):
    tok = load_tokenizer("builtin")
    code, text = corpus(tok, args.max_docs)
    # how many text repeats make 1/11 of the tokens: counted on a separate tokenizer instance so this
    # process's word cache stays cold for the timed passes
    code_chars, text_chars = sum(map(len, code)), sum(map(len, text))
    repeats = max(1, round(code_chars / 10 / text_chars))
    texts = (code + text * repeats) * args.passes
    bt = tok.backend_tokenizer
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for i in range(0, len(texts), 512):
        n += sum(len(e.ids) + 2 for e in bt.encode_batch_fast(texts[i : i + 512], add_special_tokens=False))  # +BOS/EOS
    fast_s, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
    tok2 = type(tok).from_pretrained(tok.name_or_path)  # a fresh instance: cold cache for the second measure
    n2, t0 = 0, time.perf_counter()
    for i in range(0, len(texts), 512):
        n2 += sum(len(ids) + 2 for ids in tok2(texts[i : i + 512], add_special_tokens=False)["input_ids"])
    call_s = time.perf_counter() - t0
    return {
        "tokens": n,
        "seconds": fast_s,
        "tokens_per_s": n / fast_s,
        "tokens_per_cpu_s": n / fast_cpu,
        "call_tokens_per_s": n2 / call_s,
        "docs": len(texts),
        "text_repeats": repeats,
        "peak_rss_mb": peak_rss_mb(),
    }


def side_hf(args):
    import datasets  # only this side pays for it: each side's peak RSS is its own

    datasets.disable_progress_bars()
    tok = load_tokenizer("builtin")
    code, text = corpus(tok, args.max_docs)
    repeats = max(1, round(sum(map(len, code)) / 10 / sum(map(len, text))))
    texts = (code + text * repeats) * args.passes
    block = args.seq_len

    def tokenize(examples):
        return tok(examples["text"])

    def group_texts(examples):  # transformers/examples/pytorch/language-modeling/run_clm.py
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block) * block
        result = {k: [t[i : i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    t0, c0 = time.perf_counter(), time.process_time()
    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(tokenize, batched=True, remove_columns=["text"])
    ds = ds.map(group_texts, batched=True)
    n = len(ds) * block
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens": n,
        "seconds": dt,
        "tokens_per_s": n / dt,
        "tokens_per_cpu_s": n / cpu,
        "rows": len(ds),
        "peak_rss_mb": peak_rss_mb(),
    }


def side_pipeline(args):
    tok = load_tokenizer("builtin")
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(os.path.join(ROOT, "conf/data/sample.yaml")))
    cfg.num_workers = args.workers
    target = args.tokens
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    loader = build_loader(cfg, tok, args.seq_len, args.batch, 0, 1, 1234)
    for batch in loader:
        n += batch["input_ids"].numel()
        if n >= target:
            break
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens": n,
        "seconds": dt,
        "tokens_per_s": n / dt,
        "tokens_per_cpu_s": n / cpu,
        "stats": loader.stats(),
        "peak_rss_mb": peak_rss_mb(),
    }


def scale_section(tmp_dir: str, corpus_mb: int = 100, lane_counts=(1, 64, 1024), pool_docs: int = 4000) -> dict:
    """Read amplification at 1, 64 and 1024 lanes on one JSON-lines file, and resume latency at 10% and 90% of it,
    each beside the previous (stride) design's figures: there every lane read the whole file and kept every L-th
    line (amplification = L by construction), and a resume re-read the share consumed so far (counted here by
    reading a file prefix with the same ranged reads)."""
    rng = random.Random(0)
    words = open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read().split()
    path = os.path.join(tmp_dir, "corpus.jsonl")
    pool = [json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 500)))}) + "\n" for _ in range(pool_docs)]
    block = "".join(pool).encode()
    with open(path, "wb") as f:
        for _ in range(corpus_mb * 1_000_000 // len(block) + 1):
            f.write(block)
    size = os.path.getsize(path)
    out = {"corpus_bytes": size, "amplification": {}, "resume": {}}
    for lanes in lane_counts:
        src = build_source("c", OmegaConf.merge(OmegaConf.structured(SourceConfig), {"kind": "jsonl", "path": path}), 0)
        b0 = io_counters()[0]
        for lane in range(lanes):
            for _ in src.records(0, lane, lanes):
                pass
        out["amplification"][lanes] = {
            "contiguous_shares": (io_counters()[0] - b0) / size,
            "stride_design": float(lanes),
        }
    tok = load_tokenizer("builtin")
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "sources": {"c": {"kind": "jsonl", "domain": "text", "path": path, "shuffle": False}},
            "lanes": 1,
            "prefetch_threads": 0,
        },
    )
    loader = build_loader(cfg, tok, 2048, 1, 0, 1, 0)
    next(iter(loader))
    state = loader.state_dict()
    storage = Storage()
    for frac in (0.1, 0.9):
        with open(path, "rb") as f:
            f.seek(int(frac * size))
            f.readline()
            off = f.tell()
        st = json.loads(json.dumps(state))
        st["lane_states"]["0"]["src"]["c"].update(pos=[0, off, 0], offset=0)
        t0 = time.perf_counter()
        resumed = build_loader(cfg, tok, 2048, 1, 0, 1, 0)
        resumed.load_state_dict(st)
        next(iter(resumed))
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()  # the stride design skipped `off` bytes of lines before its first record
        for start in range(0, off, 1 << 20):
            storage.read(path, start, min(off, start + (1 << 20))).count(b"\n")
        stride_read_s = time.perf_counter() - t0
        out["resume"][frac] = {
            "seconds_to_first_batch": dt,
            "stride_design_seconds_lower_bound": stride_read_s + dt,
            "stride_design_bytes_skipped": off,
        }
    return out


SIDES = {"raw": side_raw, "hf": side_hf, "pipeline": side_pipeline}


def run_side(name, args, extra=()):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--side",
        name,
        "--seq-len",
        str(args.seq_len),
        "--batch",
        str(args.batch),
        "--workers",
        str(args.workers),
        "--passes",
        str(args.passes),
        "--max-docs",
        str(args.max_docs),
        *extra,
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=sorted(SIDES))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    p.add_argument("--passes", type=int, default=2, help="passes over the corpus (steady state: read-ahead amortised)")
    p.add_argument("--tokens", type=int, default=0, help="pipeline side: tokens to produce (default: what raw counted)")
    p.add_argument("--max-docs", type=int, default=0, help="raw and hf sides: the first N code files only (0: all)")
    p.add_argument("--smoke", action="store_true", help="seconds: 20 code files, short rows, a 1 MB scale file")
    args = p.parse_args()
    if args.smoke:
        args.seq_len, args.batch, args.rounds, args.passes, args.max_docs = 128, 2, 1, 1, 20
    if args.side:
        print(json.dumps(SIDES[args.side](args)))
        return

    # the sides alternate for --rounds rounds, so a noisy neighbour on a shared machine slows all of them alike;
    # ratios use the medians (best-of figures are reported too)
    runs = {"raw": [], "pipeline": [], "hf": []}
    for _ in range(args.rounds):
        runs["raw"].append(run_side("raw", args))
        runs["pipeline"].append(run_side("pipeline", args, ["--tokens", str(runs["raw"][-1]["tokens"])]))
        runs["hf"].append(run_side("hf", args))

    def summary(rs, key="tokens_per_s"):
        vals = sorted(r[key] for r in rs)
        return {"median": statistics.median(vals), "best": vals[-1], "all": vals}

    pipe, raw, hf = (summary(runs[k]) for k in ("pipeline", "raw", "hf"))
    raw_call = summary(runs["raw"], "call_tokens_per_s")
    cpu = {k: summary(runs[k], "tokens_per_cpu_s") for k in runs}
    rss = {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    result = {
        "corpus": f"builtin (stdlib .py + pydoc topics at 10:1), {args.passes} passes",
        "seq_len": args.seq_len,
        "micro_batch_size": args.batch,
        "num_workers": args.workers,
        "rounds": args.rounds,
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1min_at_end": os.getloadavg()[0],
        "tokens": runs["raw"][0]["tokens"],
        "pipeline_tokens_per_s": pipe,
        "raw_encode_batch_fast_tokens_per_s": raw,
        "raw_tok_call_tokens_per_s": raw_call,
        "hf_map_group_texts_tokens_per_s": hf,
        "peak_rss_mb": rss,
        "ratio_vs_raw": pipe["median"] / raw["median"],
        "ratio_vs_raw_best": pipe["best"] / raw["best"],
        "ratio_vs_raw_call": pipe["median"] / raw_call["median"],
        "ratio_vs_hf": pipe["median"] / hf["median"],
        # work per token, insensitive to other processes on the machine (not to parallel efficiency)
        "tokens_per_cpu_s": cpu,
        "cpu_ratio_vs_raw": cpu["pipeline"]["median"] / cpu["raw"]["median"],
        "cpu_ratio_vs_hf": cpu["pipeline"]["median"] / cpu["hf"]["median"],
        "targets": {"ratio_vs_raw": ">= 0.8", "ratio_vs_hf": "> 1"},
        "pipeline_stats": runs["pipeline"][-1]["stats"],
    }
    print(
        f"{args.rounds} rounds, {result['tokens']:,} tokens per side, {result['cpus']} CPUs, load "
        f"{result['load_avg_1min_at_end']:.1f}"
    )
    print(f"{'side':<36}{'median tok/s':>14}{'best tok/s':>14}{'peak RSS MB':>13}")
    rows = [
        ("pipeline (read->mix->tok->pack)", pipe, rss["pipeline"]),
        ("raw encode_batch_fast (the limit)", raw, rss["raw"]),
        ("raw tok(texts) call", raw_call, None),
        ("HF datasets.map + group_texts", hf, rss["hf"]),
    ]
    for name, sm, r in rows:
        print(f"{name:<36}{sm['median']:>14,.0f}{sm['best']:>14,.0f}{'' if r is None else format(r, ',.0f'):>13}")
    print(
        f"pipeline / raw limit      = {result['ratio_vs_raw']:.3f} (best-of: {result['ratio_vs_raw_best']:.3f})  "
        "target >= 0.8"
    )
    print(f"pipeline / raw tok() call = {result['ratio_vs_raw_call']:.3f}")
    print(f"pipeline / HF recipe      = {result['ratio_vs_hf']:.3f}  target > 1")
    print(
        f"per CPU-second (load-insensitive): pipeline / raw = {result['cpu_ratio_vs_raw']:.3f}, "
        f"pipeline / HF = {result['cpu_ratio_vs_hf']:.3f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        scale = scale_section(tmp, 1, (1, 8), pool_docs=400) if args.smoke else scale_section(tmp)
    result["scale"] = scale
    print(f"scale: one JSON-lines file of {scale['corpus_bytes'] / 1e6:.0f} MB")
    print(f"{'lanes':<8}{'read amplification':>20}{'stride design':>16}")
    for lanes, a in scale["amplification"].items():
        print(f"{lanes:<8}{a['contiguous_shares']:>20.3f}{a['stride_design']:>16.0f}")
    for frac, r in scale["resume"].items():
        print(
            f"resume at {frac:.0%}: {r['seconds_to_first_batch']:.2f} s to the first batch; stride design >= "
            f"{r['stride_design_seconds_lower_bound']:.2f} s (re-reads "
            f"{r['stride_design_bytes_skipped'] / 1e6:.0f} MB first)"
        )
    write_result("data_pipeline", result, smoke=args.smoke)


if __name__ == "__main__":
    main()
