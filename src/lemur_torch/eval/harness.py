"""lm-evaluation-harness tasks (MMLU, BBH, GSM8K, MBPP, your own YAML tasks...) through lm-eval's Python API
(`simple_evaluate` on an `HFLM` over the export folder): the same model loading and request handling as the
`lm_eval` CLI, with results in lemur-eval's output folder. An optional extra: pip install '.[eval]'."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import torch


def _import_lm_eval():
    # lazy: lm-eval is an optional extra (pip install '.[eval]'); without it only its tasks are unavailable
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise SystemExit(
            f"lemur-eval: lm-evaluation-harness tasks need the lm-eval package ({exc}); "
            f"install it with: pip install '.[eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


def run_harness(
    model_dir: str,
    tasks: List[str],
    cfg,
    out_dir: str,
    limit,
    device: str,
    dtype: str,
    chat: bool,
    seed: int,
    log=print,
) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Evaluate `tasks`; writes out_dir/results.json and out_dir/samples_<task>.jsonl. Returns lm-eval's
    results (without the samples) and the summary rows."""
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    from lm_eval.utils import handle_non_serializable  # present once _import_lm_eval succeeded

    h = cfg
    apply_chat = chat if h.apply_chat_template is None else bool(h.apply_chat_template)
    manager = TaskManager(include_path=h.include_path) if h.include_path else TaskManager()
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = (
            f" or in harness.include_path={h.include_path}"
            if h.include_path
            else " (set harness.include_path for local task files)"
        )
        raise SystemExit(f"lemur-eval: unknown task(s) {', '.join(unknown)}: not lm-eval tasks{where}")
    model_args: Dict[str, Any] = {"pretrained": model_dir, "dtype": dtype, "device": device, "batch_size": h.batch_size}
    if h.add_bos_token is not None:
        model_args["add_bos_token"] = h.add_bos_token
    if device == "cuda" and torch.cuda.device_count() > 1:
        model_args["parallelize"] = True  # a model larger than one GPU: spread over all of them
    log(f"lm-eval: {', '.join(tasks)} with {model_args}, chat template {'on' if apply_chat else 'off'}")
    lm = HFLM(**model_args)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=h.num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=h.bootstrap_iters,
        log_samples=h.log_samples,
        apply_chat_template=apply_chat,
        fewshot_as_multiturn=bool(apply_chat and h.num_fewshot),
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    os.makedirs(out_dir, exist_ok=True)
    samples = results.pop("samples", None) or {}
    for task, rows in samples.items():
        with open(os.path.join(out_dir, f"samples_{task}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable) + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable)
    return results, summary_rows(results)


def summary_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (task, metric, filter) of lm-eval's results: value, standard error, documents."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            # "metric,filter" keys only ("alias", "name", "sample_len" are bookkeeping)
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = task if filt in ("none", "") else f"{task} [{filt}]"
            rows.append(
                {
                    "task": name,
                    "metric": metric,
                    "value": value,
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "n": n,
                }
            )
    return rows
