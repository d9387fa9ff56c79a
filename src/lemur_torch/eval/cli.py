"""`lemur-eval MODEL [--tasks humaneval,mmlu,...] [--out DIR] [--limit N] [key=value ...]`: benchmarks of an HF
export folder, or of a lemur-torch checkpoint folder through a temporary export (lemur_torch.export).

Output folder (default <run_dir>/eval/<model folder name>):
  summary.json       every task's headline numbers, the composed config, the model, the sandbox, timings
  summary.md         the summary table (also printed)
  humaneval/results.jsonl, humaneval/metrics.json      one line per problem; pass@k and throughput
  lm_eval/results.json, lm_eval/samples_<task>.jsonl   lm-eval's results and per-document records
Exit status: 0 done, 2 bad arguments or config (one line naming the key or path).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch.config import load_config
from lemur_torch.errors import ConfigError
from lemur_torch.eval.config import EvalConfig  # importing it registers the lemur_eval schema
from lemur_torch.eval.harness import run_harness
from lemur_torch.eval.sandbox import Sandbox, SandboxLimits
from lemur_torch.fields import check_bounds

HUMANEVAL = "humaneval"


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")
    )


def is_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("meta.json", "config.yaml"))


def default_out_dir(model: str) -> str:
    """<run_dir>/eval/<name> for <run_dir>/hf and <run_dir>/checkpoints/<name>; <parent>/eval/<name> otherwise."""
    model = os.path.abspath(model).rstrip("/")
    parent, name = os.path.split(model)
    if os.path.basename(parent) == "checkpoints":
        parent = os.path.dirname(parent)
    return os.path.join(parent, "eval", name)


def validate(cfg: DictConfig) -> None:
    """Every bound on the schema's fields, then the combinations; ConfigError naming the key."""
    check_bounds(cfg, EvalConfig, "", ConfigError)
    h = cfg.humaneval
    if not cfg.tasks:
        raise ConfigError("tasks", "no task given; e.g. --tasks humaneval")
    bad_k = [k for k in h.k if k < 1 or k > h.n_samples]
    if bad_k:
        raise ConfigError("humaneval.k", f"{bad_k}: each k must be in 1..humaneval.n_samples={h.n_samples}")
    if h.temperature == 0 and h.n_samples > 1:
        raise ConfigError(
            "humaneval.n_samples",
            f"{h.n_samples} greedy samples (temperature 0) would all be the "
            f"same; sample with humaneval.temperature > 0 or use n_samples=1",
        )


def resolve_model(path: str) -> Tuple[str, Optional[str]]:
    """(an HF export folder, a temporary folder to delete afterwards or None)."""
    path = os.path.abspath(path)
    if is_export(path):
        return path, None
    if is_checkpoint(path):
        # lazy: the export loads transformers (seconds), which an export folder or a config error never needs
        from lemur_torch.export import main as export_main

        tmp = tempfile.mkdtemp(prefix="lemur-eval-export-")
        out = os.path.join(tmp, "hf")  # a fresh path: the export creates it and refuses nothing
        print(f"lemur-eval: {path} is a checkpoint: exporting it to {out} first")
        if export_main([path, out]) != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError("model", f"could not export checkpoint {path} (see lemur-export's message above)")
        return out, tmp
    hint = ""
    if os.path.isdir(os.path.join(path, "hf")) or os.path.isdir(os.path.join(path, "checkpoints")):
        hf, ckpts = os.path.join(path, "hf"), os.path.join(path, "checkpoints")
        hint = f": it looks like a run folder; pass {hf} or one of {ckpts}/step_*"
    raise ConfigError(
        "model",
        f"{path} is neither an HF export (config.json + model.safetensors[.index.json]) "
        f"nor a lemur-torch checkpoint (meta.json + config.yaml){hint}",
    )


def device_and_dtype(cfg: DictConfig) -> Tuple[str, str]:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = str(cfg.dtype) if cfg.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, dtype


def load_model(export: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: the first transformers import costs seconds

    tokenizer = AutoTokenizer.from_pretrained(export)
    # on GPUs, accelerate's device map spreads a model larger than one device over all of them
    device_map = "auto" if device == "cuda" else device
    model = AutoModelForCausalLM.from_pretrained(export, dtype=getattr(torch, dtype), device_map=device_map).eval()
    return model, tokenizer


def format_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for r in rows:
        stderr = "" if r.get("stderr") is None else f"{r['stderr']:.4f}"
        lines.append(
            f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} | {'' if r.get('n') is None else r['n']} |"
        )
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> Dict[str, Any]:
    started = time.time()
    export, tmp = resolve_model(cfg.model)
    out_dir = os.path.abspath(cfg.out_dir or default_out_dir(cfg.model))
    os.makedirs(out_dir, exist_ok=True)
    device, dtype = device_and_dtype(cfg)
    harness_tasks = [t for t in cfg.tasks if t != HUMANEVAL]
    summary: Dict[str, Any] = {
        "model": os.path.abspath(cfg.model),
        "export": export,
        "device": device,
        "dtype": dtype,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "tasks": {},
        "rows": [],
    }
    try:
        from transformers import AutoTokenizer  # lazy: the first transformers import costs seconds

        chat = AutoTokenizer.from_pretrained(export).chat_template is not None
        summary["chat_template"] = chat
        if HUMANEVAL in cfg.tasks:
            from lemur_torch.eval.humaneval import run_humaneval  # lazy: its generation loads transformers

            s = cfg.sandbox
            limits = SandboxLimits(**{f.name: s[f.name] for f in dataclasses.fields(SandboxLimits)})
            sandbox = Sandbox(limits, workers=s.workers, site_packages=s.site_packages)
            model, tokenizer = load_model(export, device, dtype)
            metrics = run_humaneval(
                model, tokenizer, cfg.humaneval, sandbox, os.path.join(out_dir, HUMANEVAL), cfg.limit, cfg.seed
            )
            del model  # lm-eval loads its own copy next
            gc.collect()
            summary["tasks"][HUMANEVAL] = metrics
            summary["rows"] += [
                {"task": HUMANEVAL, "metric": k, "value": v, "stderr": None, "n": metrics["problems"]}
                for k, v in metrics.items()
                if k.startswith("pass@")
            ]
        if harness_tasks:
            results, rows = run_harness(
                export,
                harness_tasks,
                cfg.harness,
                os.path.join(out_dir, "lm_eval"),
                cfg.limit,
                device,
                dtype,
                chat,
                cfg.seed,
            )
            summary["tasks"]["lm_eval"] = results.get("results", {})
            summary["rows"] += rows
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    summary["duration_s"] = round(time.time() - started, 2)
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    table = format_table(summary["rows"])
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(f"# {summary['model']}\n\n{table}\n")
    print(table)
    print(f"lemur-eval: results in {out_dir}")
    summary["out_dir"] = out_dir
    return summary


def build_config(argv: Optional[List[str]] = None) -> Tuple[DictConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="lemur-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("model", help="an HF export folder (RUN/hf) or a checkpoint folder (RUN/checkpoints/step_N)")
    parser.add_argument("--tasks", help="comma-separated: humaneval and/or lm-evaluation-harness task names")
    parser.add_argument("--out", help="output folder (default: <run_dir>/eval/<model folder name>)")
    parser.add_argument("--limit", type=int, help="first N problems / documents of each task")
    parser.add_argument("--include-path", help="folder of extra lm-eval task YAML files (harness.include_path)")
    parser.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of conf/lemur_eval.yaml")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.overrides, config_name="lemur_eval")
    cfg.model = args.model
    if args.tasks:
        cfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.out:
        cfg.out_dir = args.out
    if args.limit is not None:
        cfg.limit = args.limit
    if args.include_path:
        cfg.harness.include_path = os.path.abspath(args.include_path)
    validate(cfg)
    return cfg, args.cfg


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg, show = build_config(argv)
        if show:
            print(OmegaConf.to_yaml(cfg))
            return 0
        evaluate(cfg)
    except ConfigError as exc:
        print(f"lemur-eval: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the sandbox could not run programs on this machine (it says why)
        print(f"lemur-eval: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
