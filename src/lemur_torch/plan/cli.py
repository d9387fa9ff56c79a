"""`lemur-plan [--json] [--search] [overrides]`: the plan of the run the overrides describe, on a cluster.

    lemur-plan experiment=lemur_70b_pretrain cluster.device=h100_sxm cluster.devices=512
    lemur-plan experiment=lemur_70b_pretrain cluster=h100_sxm_256
    lemur-plan experiment=lemur_70b_pretrain_tpu_v4 cluster=tpu_v4_512
    lemur-plan --search experiment=lemur_70b_pretrain cluster.device=h100_sxm cluster.devices=256

The run's own Hydra overrides (experiment=, model.*, train.*, parallel.*) and the `cluster` group (conf/cluster/:
`cluster.device`, `cluster.devices`, `cluster.devices_per_node`, `cluster.inter_node_gbps`,
`cluster.intra_node_gbps`, `cluster.memory_gib`) are composed as lemur-train composes them and checked by the same
gate (lemur_torch.config: the schema's types and bounds, the combinations no backend runs); a bad setting is one
line naming its key (exit status 2). `--world-size N` alone prints the real FSDP2 sharding over N fake ranks as
JSON.
Every figure is an estimate: FLOPs, bytes and collectives at rates from datasheets and published kernel
measurements, checked against published runs (tests/data/calibration.csv).
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from lemur_torch.config import check_values, load_config
from lemur_torch.errors import ConfigError, InputError
from lemur_torch.metrics import duration
from lemur_torch.plan.cluster import resolve
from lemur_torch.plan.memory import GIB
from lemur_torch.plan.predict import Plan
from lemur_torch.plan.run import plan_run, setting_of, shape_of
from lemur_torch.plan.search import Candidate, search

USAGE = "usage: lemur-plan [--json] [--search] [--top N] [--world-size N] [key=value ...]"


def describe(plan: Plan, title: str) -> str:
    s, c, m = plan.setting, plan.cluster, plan.memory
    d = c.device
    link = f"{c.inter_node_gbps:g} Gb/s per device" + ("" if d.tpu else f", NVLink {c.intra_node_gbps:g} Gb/s")
    lines = [
        f"lemur-plan: {title}",
        f"cluster: {c.devices} x {d.kind} ({c.devices_per_node} per {'host' if d.tpu else 'node'}, {link}, "
        f"{c.memory_gib:g} GiB, {d.peak_flops / 1e12:.0f} TFLOP/s bf16)",
        f"model: {plan.shape.name or 'model'} {plan.shape.total_params / 1e9:.2f}B parameters, seq {s.seq_len}; "
        f"{s.describe()}",
        f"memory per device, peak during {m.moment}:",
    ]
    lines += [f"  {name:22s} {v / GIB:8.2f} GiB" for name, v in m.components.items()]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':22s} {m.peak / GIB:8.2f} GiB of {c.memory_gib:g}: {verdict}")
    t = plan.time.parts
    lines.append(f"step time: {plan.step_time_s:.2f} s")
    lines += [f"  {name:22s} {v:8.2f} s" for name, v in t.items() if v >= 0.0005]
    mfu = f"{100 * plan.mfu:.1f}%" if plan.mfu is not None else "n/a"
    lines += [
        f"tokens/s per device: {plan.tokens_per_s_per_device:,.0f}; MFU {mfu} "
        f"(6N + 12*L*d*s = {plan.model_flops_per_token:.3g} FLOPs/token, the trainer's definition)",
        f"{plan.max_steps:,} steps: {plan.days:.2f} days ({duration(plan.days * 86400)})",
        f"bottleneck: {plan.bottleneck}",
        "(an estimate: FLOPs, bytes and collectives at datasheet rates and measured kernel efficiencies, checked "
        "against published runs; the first real run's step_time_s calibrates it)",
    ]
    return "\n".join(lines)


def describe_search(found: List[Candidate], top: int) -> str:
    if not found:
        return "no setting fits (every split of the global batch, every checkpointing policy): more devices needed"
    lines = [f"{len(found)} settings fit; the {min(top, len(found))} fastest:"]
    for i, c in enumerate(found[:top], 1):
        p = c.plan
        mfu = f"{100 * p.mfu:.1f}%" if p.mfu is not None else "n/a"
        lines.append(
            f"{i}. {p.step_time_s:7.2f} s/step  {p.tokens_per_s_per_device:7,.0f} tok/s/device  MFU {mfu}  "
            f"{p.memory.peak / GIB:5.1f} GiB  {p.days:.2f} days  {p.bottleneck}: {p.setting.describe()}"
        )
        lines.append(f"   {' '.join(c.overrides)}")
        if c.pending:
            lines.append(f"   (not yet trainer settings: {' '.join(c.pending)})")
    today = next((c for c in found if not c.pending), None)
    if today is not None and today is not found[0]:
        p = today.plan
        lines.append(
            f"fastest with settings the trainer takes today: {p.step_time_s:.2f} s/step, "
            f"{p.tokens_per_s_per_device:,.0f} tok/s/device, {p.days:.2f} days: {' '.join(today.overrides)}"
        )
    return "\n".join(lines)


def run(args: List[str]) -> int:
    flags = {"--json": False, "--search": False}
    top, world = 5, None
    rest: List[str] = []
    it = iter(args)
    for arg in it:
        if arg in flags:
            flags[arg] = True
        elif arg in ("--top", "--world-size"):
            value = next(it, None)
            if value is None or not value.isdigit() or int(value) < 1:
                raise ConfigError(arg, f"needs a positive whole number, got {value!r}")
            top, world = (int(value), world) if arg == "--top" else (top, int(value))
        elif arg.startswith("--"):
            raise ConfigError(arg, f"unknown option; {USAGE}")
        else:
            rest.append(arg)
    if world is not None:  # the sharding alone
        # builds the meta model (transformers) and wraps it with FSDP2: seconds the plan itself does without
        from lemur_torch.plan.sharding import shard_on_fake_pg

        print(json.dumps(shard_on_fake_pg(load_config(rest), world), indent=1))
        return 0
    cfg = load_config(rest)
    check_values(cfg)
    cluster = resolve(cfg.cluster)
    title = " ".join(rest) or "the default run"
    if flags["--search"]:
        base = setting_of(cfg, cluster)
        found = search(
            shape_of(cfg),
            base,
            cluster,
            int(cfg.train.global_batch_tokens),
            int(cfg.train.max_steps),
            float8_available="float8" in cfg.parallel,
            known_keys={f"{group}.{key}" for group in ("train", "parallel") for key in cfg[group]},
        )
        if flags["--json"]:
            print(
                json.dumps([{**c.plan.to_json(), "overrides": c.overrides, "pending": c.pending} for c in found[:top]])
            )
        else:
            print(describe_search(found, top))
            if found:
                print("\n" + describe(found[0].plan, f"{title} {' '.join(found[0].overrides)}"))
        return 0
    plan = plan_run(cfg, cluster)
    print(json.dumps(plan.to_json()) if flags["--json"] else describe(plan, title))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return 0
    try:
        return run(args)
    except InputError as exc:  # as lemur-train: one line, the status on the class
        print(f"lemur-plan: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
