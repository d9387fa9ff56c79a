"""The XLA step on the CPU PJRT device (4 virtual devices), side by side in one run; run in the XLA venv
(`make bench` does: .venv-xla/bin/python bench/xla_step.py; without that venv it says it skipped).

1. Trace + compile time of the first two steps (the step without and with optimizer state: the programs a
   job compiles at every start) for 4, 16 and 32 decoder layers, unrolled (FSDPv2-wrapped layers) vs
   `parallel.scan_layers` (one layer traced and compiled, looped in an XLA While); activation checkpointing
   on in both. Trace = the host's Python time building the lazy graph up to the sync; compile = torch_xla's
   CompileTime metric.
2. Host-idle time per step with and without a per-step host sync, on the real Trainer: "sync" reads each
   step's metrics right after dispatching it, "pipelined" reads them one step later, inside the next step once
   it is dispatched whole (Trainer.fit's order, lemur_torch/trainer.py: lr and guard are on the device).
   Host idle = the time the host waits in that read; reported with the step wall time.

Each compile measurement runs in its own process (SPMD is process-global, and compile counts start at zero
there); the two host-idle modes share one process, the second running on the programs the first compiled
(steps 1 and 2, which compile, are left out of both). The CPU "device" shares the same cores
as the host, so the overlap the pipelined order buys on a TPU (host tracing while the chip computes) is only
partly visible here; no TPU figure is printed because none was measured.
Writes bench/results/xla_step.json. `--smoke`: 2 decoder layers, unrolled and scanned, 2 steady steps per mode,
written to xla_step.smoke.json; in the XLA venv: `.venv-xla/bin/python bench/xla_step.py --smoke`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from results_io import write_result  # bench/ is on sys.path: this script's folder

from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.metrics import MetricsLogger
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.tokenizer import build_tokenizer
from lemur_torch.trainer import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = [
    "model=tiny",
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.global_batch_tokens=256",
    "parallel=xla_spmd",
    "parallel.mixed_precision=fp32",
    "parallel.activation_checkpointing=full",
    "parallel.xla_cache_dir=null",
    "log.wandb_mode=disabled",
    "log.console=false",
    "optim.warmup_steps=2",
]


def _parts(overrides):
    # torch_xla: imported in the measuring children only (SPMD mode is process-global)
    from lemur_torch.parallel.xla.backend import XlaSpmdBackend

    cfg = load_config([*MODEL, *overrides])
    backend = XlaSpmdBackend(cfg)
    loader = build_loader(
        cfg.data,
        build_tokenizer(cfg.data),
        cfg.train.seq_len,
        cfg.train.micro_batch_size,
        backend.dp_rank,
        backend.dp_size,
        cfg.train.seed,
    )
    model = backend.setup_model(cfg)
    opt = build_optimizer(model, cfg.optim, backend.device.type)
    sched = build_scheduler(opt, cfg.optim, cfg.train.max_steps)
    trainer = Trainer(
        cfg, backend, model, opt, sched, loader, Checkpointer(cfg, backend), MetricsLogger(cfg, enabled=False)
    )
    return trainer, backend.device_batches(iter(loader))


def measure_compile(layers: int, scan: bool) -> dict:
    """Steps 1 and 2 (both programs), then 3 steady steps."""
    import torch_xla.core.xla_model as xm  # torch_xla: the measuring children only
    import torch_xla.debug.metrics as met

    trainer, batches = _parts(
        [f"model.num_hidden_layers={layers}", f"parallel.scan_layers={str(scan).lower()}", "train.max_steps=5"]
    )
    backend = trainer.backend
    marks = {}
    step_done = backend.step_done

    def timed_step_done():
        marks["traced"] = time.perf_counter()
        step_done()
        xm.wait_device_ops()

    backend.step_done = timed_step_done
    trace, walls = 0.0, []
    for step in range(5):
        micro = [next(batches) for _ in range(trainer.grad_accum)]
        t0 = time.perf_counter()
        trainer.train_step(micro)
        if step < 2:
            trace += marks["traced"] - t0
        trainer.read_in_flight()
        walls.append(time.perf_counter() - t0)
    compile_s = met.metric_data("CompileTime")[1] / 1e9
    return {
        "layers": layers,
        "scan": scan,
        "trace_s": trace,
        "compile_s": compile_s,
        "first_two_steps_s": sum(walls[:2]),
        "steady_step_s": min(walls[2:]),
        "programs": met.counter_value("UncachedCompile"),
    }


def measure_host_idle(mode: str, steps: int, layers: int) -> dict:
    """sync: each step is read right after it is dispatched; pipelined: as Trainer.fit does, the previous step
    is read inside train_step, once this step is dispatched whole."""
    trainer, batches = _parts(["train.max_steps=1000", f"model.num_hidden_layers={layers}"])
    waits, walls = [], []
    read = trainer.read_in_flight

    def timed_read(ended=None, only_if_ready=False):
        step = trainer.in_flight
        w0 = time.perf_counter()
        read(ended, only_if_ready)
        if step is not None and step.step > 2:  # after both programs are compiled
            waits.append(time.perf_counter() - w0)

    trainer.read_in_flight = timed_read  # train_step's own read of the previous step is timed too
    for step in range(steps + 2):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(trainer.grad_accum)]
        trainer.train_step(micro, started=t0)
        if mode == "sync":
            trainer.read_in_flight()
        if step >= 2:
            walls.append(time.perf_counter() - t0)
    read()
    return {
        "mode": mode,
        "steps": steps,
        "host_idle_s_per_step": sum(waits) / len(waits),
        "step_s": sum(walls) / len(walls),
    }


def _child(args) -> int:
    if args.what == "compile":
        out = measure_compile(args.layers, args.scan)
    else:  # the modes one after the other in this one process: the second finds the first's programs compiled
        out = [measure_host_idle(mode, args.steps, args.idle_layers) for mode in args.mode.split(",")]
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _run_child(extra) -> dict:
    env = {
        **os.environ,
        "PJRT_DEVICE": "CPU",
        "CPU_NUM_DEVICES": os.environ.get("CPU_NUM_DEVICES", "4"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
    }
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{extra} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=["compile", "idle"], default="compile")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scan", action="store_true")
    parser.add_argument("--mode", default="sync,pipelined", help="host-idle modes, comma-separated: sync, pipelined")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--depths", default="4,16,32", help="decoder layer counts for the compile comparison")
    parser.add_argument("--idle-layers", type=int, default=8, help="decoder layers for the host-idle comparison")
    parser.add_argument("--smoke", action="store_true", help="2 decoder layers, 2 steady steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.depths, args.idle_layers, args.steps = "2", 2, 2
    if args.child:
        return _child(args)
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        print("xla_step: skipped (torch_xla is not installed here; make bench runs this in .venv-xla)")
        return 0

    compile_rows = []
    print("trace + compile of the first two steps (CPU PJRT, 4 devices, tiny model, seq 64, AC full)")
    print(f"{'layers':>6} {'mode':>9} {'trace s':>8} {'compile s':>9} {'2 steps s':>9} {'steady s':>8} {'programs':>8}")
    for layers in [int(d) for d in args.depths.split(",")]:
        for scan in (False, True):
            r = _run_child(["--what", "compile", "--layers", str(layers), *(["--scan"] if scan else [])])
            compile_rows.append(r)
            print(
                f"{layers:>6} {'scan' if scan else 'unrolled':>9} {r['trace_s']:>8.2f} {r['compile_s']:>9.2f} "
                f"{r['first_two_steps_s']:>9.2f} {r['steady_step_s']:>8.3f} {r['programs']:>8}",
                flush=True,
            )
    by = {(r["layers"], r["scan"]): r for r in compile_rows}
    depths = sorted({r["layers"] for r in compile_rows})
    lo, hi = depths[0], depths[-1]
    ratios = {}
    for scan in (False, True):
        growth = (by[(hi, scan)]["trace_s"] + by[(hi, scan)]["compile_s"]) / (
            by[(lo, scan)]["trace_s"] + by[(lo, scan)]["compile_s"]
        )
        ratios[f"trace_compile_growth_{lo}_to_{hi}_{'scan' if scan else 'unrolled'}"] = growth
    for d in depths:
        ratios[f"scan_over_unrolled_trace_compile_{d}"] = (by[(d, True)]["trace_s"] + by[(d, True)]["compile_s"]) / (
            by[(d, False)]["trace_s"] + by[(d, False)]["compile_s"]
        )
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")

    print(
        f"\nhost idle per step, {args.steps} steady steps, {args.idle_layers} layers (real Trainer.train_step / "
        "read_in_flight)"
    )
    idle = _run_child(
        [
            "--what",
            "idle",
            "--mode",
            "sync,pipelined",
            "--steps",
            str(args.steps),
            "--idle-layers",
            str(args.idle_layers),
        ]
    )
    for r in idle:
        print(
            f"  {r['mode']:>9}: host idle {1000 * r['host_idle_s_per_step']:8.1f} ms/step, step "
            f"{1000 * r['step_s']:8.1f} ms"
        )
    ratios["host_idle_pipelined_over_sync"] = idle[1]["host_idle_s_per_step"] / max(
        idle[0]["host_idle_s_per_step"], 1e-9
    )
    ratios["step_time_pipelined_over_sync"] = idle[1]["step_s"] / idle[0]["step_s"]
    print(
        f"  host_idle_pipelined_over_sync: {ratios['host_idle_pipelined_over_sync']:.2f}  "
        f"step_time_pipelined_over_sync: {ratios['step_time_pipelined_over_sync']:.2f}"
    )
    print("  (CPU PJRT: the device computes on the host's own cores; no TPU figure measured)")

    write_result(
        "xla_step",
        {
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "compile": compile_rows,
            "host_idle": idle,
            "ratios": ratios,
        },
        smoke=args.smoke,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
