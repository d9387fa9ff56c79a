"""`lemur-report RUN_DIR` (or `lemur-report key=value ...`, the overrides given to lemur-train): the run's curves
from metrics.jsonl in one PNG (training loss per domain, validation loss per domain, learning rate, tokens/s,
MFU when known, gradient norm) and a short summary on stdout.

metrics.jsonl is appended to by every (resumed) job of a run, and a step may be logged in several lines (a
training line, a validation line): the lines of a step are merged key by key, the latest value of each key wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lemur_torch.errors import ConfigError

PANELS = ("training loss", "validation loss", "learning rate", "tokens/s", "MFU", "gradient norm")


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """One dict per step (its lines merged, later values winning), in step order. A torn line (a job killed
    mid-write) is skipped."""
    by_step: Dict[int, Dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def series(metrics: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of one key, skipping steps where it is absent, null or not finite."""
    steps, values = [], []
    for m in metrics:
        v = m.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(m["step"])
            values.append(float(v))
    return steps, values


def keys_with_prefix(metrics: Sequence[Dict[str, Any]], prefix: str) -> List[str]:
    seen: Dict[str, None] = {}
    for m in metrics:
        for k in m:
            if k.startswith(prefix) and "/" not in k[len(prefix) :]:
                seen[k] = None
    return list(seen)


def build_figure(metrics: Sequence[Dict[str, Any]], title: str = ""):
    import matplotlib  # lazy: about a second to import, and only the figure needs it

    matplotlib.use("Agg")  # files only: no display needed (and none on a cluster node)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    ax = dict(zip(PANELS, axes.flat))
    for name, a in ax.items():
        a.set_title(name)
        a.set_xlabel("step")
        a.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        a.grid(alpha=0.3)

    def plot(a, key, label, **kw):
        x, y = series(metrics, key)
        if x:
            if len(x) <= 50:  # a short run, or a domain seen at few steps: points stay visible
                kw.setdefault("marker", "o")
                kw.setdefault("markersize", 2.5)
            a.plot(x, y, label=label, **kw)
        return bool(x)

    train_domains = [k[len("loss/") :] for k in keys_with_prefix(metrics, "loss/")]
    val_domains = [k[len("val/loss/") :] for k in keys_with_prefix(metrics, "val/loss/")]
    domains = list(dict.fromkeys(train_domains + val_domains))
    color = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(domains)}  # a domain keeps its colour
    plot(ax["training loss"], "loss", "all", color="black", linewidth=1.2)
    for d in train_domains:
        plot(ax["training loss"], f"loss/{d}", d, color=color[d], linewidth=0.8, alpha=0.8)
    plot(ax["validation loss"], "val/loss", "all", color="black", marker="o", markersize=3)
    # val/loss/<name> is per domain and per source: sources (names that are not a training domain) dashed and
    # drawn first, so a domain of one source, whose curve is the same, stays visible on top
    others = [d for d in val_domains if train_domains and d not in train_domains]
    for d in others + [d for d in val_domains if d not in others]:
        style = dict(linestyle="--", linewidth=0.9, markersize=2) if d in others else dict(markersize=3)
        plot(ax["validation loss"], f"val/loss/{d}", d, color=color[d], marker="o", **style)
    plot(ax["learning rate"], "lr", "lr")
    plot(ax["tokens/s"], "tokens_per_s", "tokens/s")
    plot(ax["gradient norm"], "grad_norm", "grad norm", linewidth=0.8)
    if plot(ax["MFU"], "mfu", "MFU"):
        ax["MFU"].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    empty = {
        "validation loss": "no val/loss/<domain> in metrics.jsonl",
        "MFU": "MFU unknown (no peak FLOP/s for this device)",
    }
    for name, a in ax.items():
        if a.lines:
            if len(a.lines) > 1:
                a.legend(fontsize=8)
        else:
            a.text(0.5, 0.5, empty.get(name, "no data"), ha="center", va="center", transform=a.transAxes, color="gray")
    ax["training loss"].set_ylabel("nats/token")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def summarize(metrics: Sequence[Dict[str, Any]]) -> str:
    if not metrics:
        return "no steps logged"
    last = metrics[-1]
    lines = [
        f"steps {metrics[0]['step']}..{last['step']} ({len(metrics)} logged), "
        f"{last.get('tokens_seen', 0):,} tokens seen, {last.get('skipped_steps', 0)} skipped step(s)"
    ]
    domains = [k for k in keys_with_prefix(metrics, "loss/")]
    loss = f"loss {last['loss']:.4f}" if isinstance(last.get("loss"), (int, float)) else "loss n/a"
    per_dom = [f"{k[5:]} {series(metrics, k)[1][-1]:.4f}" for k in domains if series(metrics, k)[1]]
    lines.append(f"last training {loss}" + (f" ({', '.join(per_dom)}, latest per domain)" if per_dom else ""))
    val = [
        (label, series(metrics, key))
        for label, key in [("all", "val/loss")]
        + [(k[len("val/loss/") :], k) for k in keys_with_prefix(metrics, "val/loss/")]
    ]
    val = [(label, s) for label, s in val if s[0]]
    if val:
        lines.append(
            "validation loss: "
            + ", ".join(f"{label} {s[1][-1]:.4f} at step {s[0][-1]} (best {min(s[1]):.4f})" for label, s in val)
        )
    _, tps = series(metrics, "tokens_per_s")
    if tps:
        recent = tps[len(tps) // 2 :] or tps  # the second half: past compilation and warm-up
        lines.append(
            f"throughput: median {statistics.median(recent):,.0f} tokens/s over the last {len(recent)} logged steps"
        )
    _, mfu = series(metrics, "mfu")
    if mfu:
        lines.append(f"MFU: median {100 * statistics.median(mfu[len(mfu) // 2 :] or mfu):.1f}%")
    _, step_time = series(metrics, "step_time_s")
    if step_time:
        lines.append(f"time in logged steps: {sum(step_time) / 60:.1f} min")
    return "\n".join(lines)


def run_dir_from(args: Sequence[str]) -> str:
    """A folder, or lemur-train's overrides (the run folder is the composed config's run_dir)."""
    if len(args) == 1 and "=" not in args[0]:
        return args[0]
    # lazy: composing a config loads torch (through the data pipeline); a run folder needs none of it
    from lemur_torch.config import load_config

    return load_config(list(args)).run_dir


def write_report(run_dir: str, out: Optional[str] = None) -> Tuple[str, str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a lemur-train run folder (run_dir)?")
    metrics = read_metrics(path)
    fig = build_figure(metrics, title=os.path.abspath(run_dir))
    out = out or os.path.join(run_dir, "report.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    import matplotlib.pyplot as plt  # loaded by build_figure already

    plt.close(fig)
    return out, summarize(metrics)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lemur-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="+", help="a run folder, or the key=value overrides given to lemur-train")
    parser.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    args = parser.parse_args(argv)
    try:
        run_dir = run_dir_from(args.run)
        out, text = write_report(run_dir, args.out)
    except (FileNotFoundError, ConfigError) as exc:
        print(f"lemur-report: {exc}", file=sys.stderr)
        return 2
    print(text)
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
