"""Checkpoint saves: how long each one holds training, with checkpoint.async_mode none vs async vs async_pinned.

One process trains a Llama big enough for saves to matter here (8 layers of width 512 and the 32000-row
vocabulary: ~56M parameters, ~0.68 GB of fp32 weights and Adam moments) through the real Trainer.train_step and
Checkpointer, on a 1-rank gloo group. For each mode in turn, on the same model, `--saves` times: a window of
steps without a save, then a save followed by a window of the same length (interleaved, so that a change in the
machine's load hits both). Reported per mode (medians over the saves): the time training was blocked per save
(the save call, the wait for staging before the next optimizer step, and what is left of the write at the end
of the window, which would hold the next save), the time from the call to the commit, and the steps/s of a
window holding a save against one without. Writes bench/results/checkpoint.json.
Target: async blocks training < 10% as long as a synchronous save. `--smoke`: the tiny model with 512 words, one
save per mode after 1-step windows, the commit of 8 ranks and the tiny model's state on 8 ranks, written to
checkpoint.smoke.json.
Scale: rank 0's commit against the number of ranks that wrote the folder (8, 64, 512: one shard and one rng file
each), and Llama-2-70B's state per rank at 256 and 512 ranks (the host memory each rank stages per save).

On this CPU-only machine the "device" is host memory: staging is a memcpy and pinned memory does not exist, so
async_pinned is the same background staging into pageable buffers as on a GPU without the pinning; the
background write competes with training for the same cores, which the with-save window shows.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf
from results_io import TESTS, write_result  # bench/ is on sys.path: this script's folder

from lemur_torch import commit
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config
from lemur_torch.metrics import MetricsLogger
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.parallel.fsdp import FsdpBackend
from lemur_torch.plan.sharding import shard_on_fake_pg
from lemur_torch.trainer import Trainer

sys.path.insert(0, TESTS)
from fakes import ListLoader, random_batches  # noqa: E402  (the tests' fake loader and contract batches)

MODES = ("none", "async", "async_pinned")


class CheckpointFigures(MetricsLogger):
    """A logger that keeps the checkpoint figures the trainer logs with its steps and drops the rest.
    Checkpointer.stats() hands a save's figures out once: to the first step logged after the save completed, or,
    if none was, to the next caller."""

    def __init__(self, cfg):
        super().__init__(cfg, enabled=False)
        self.saves = []

    def log_step(self, metrics):
        if "ckpt_step" in metrics:
            self.saves.append({k: v for k, v in metrics.items() if k.startswith("ckpt_")})

    def figures(self, ckpt: Checkpointer, step: int) -> dict:
        """The figures of the save of `step`, once it is written (after ckpt.wait())."""
        report = ckpt.stats() or self.saves.pop()
        self.saves.clear()
        assert report["ckpt_step"] == step, (report, step)
        return report


def commit_cost(scratch: str, ranks: int, shard_bytes: int = 1 << 16) -> float:
    """Seconds rank 0's commit takes (fsync of every file and folder, marker, rename, parent fsync) for a
    checkpoint folder written by `ranks` ranks: one DCP shard file and one rng file each, plus the metadata."""
    final = os.path.join(scratch, f"commit-{ranks}", "step_00000001")
    staging = commit.begin(final, "rename", "meta.json")
    os.makedirs(os.path.join(staging, "rng"))
    blob = os.urandom(shard_bytes)
    for r in range(ranks):
        with open(os.path.join(staging, f"__{r}_0.distcp"), "wb") as f:
            f.write(blob)
        with open(os.path.join(staging, "rng", f"rank_{r}.pt"), "wb") as f:
            f.write(blob[:6000])
    with open(os.path.join(staging, ".metadata"), "wb") as f:
        f.write(blob)
    t0 = time.perf_counter()
    commit.commit(staging, final, "rename", "meta.json", b"{}")
    return time.perf_counter() - t0


def state_per_rank(model: str, world_size: int) -> float:
    """GB of checkpointed state (fp32 weights + two Adam moments) per rank for `model` (a conf/model name), from
    the real FSDP2 sharding on the meta device over a fake process group: what each rank stages per save."""
    plan = shard_on_fake_pg(load_config([f"model={model}"]), world_size)
    return plan["local_params"] * 12 / 1e9


def timed_steps(trainer: Trainer, batches, n: int) -> float:
    """Seconds for `n` steps, each read as Trainer.fit reads it (one step late), the last one at the end."""
    t0 = time.perf_counter()
    for _ in range(n):
        trainer.train_step([next(batches) for _ in range(trainer.grad_accum)])
    trainer.read_in_flight()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=4, help="steps per window")
    ap.add_argument("--saves", type=int, default=3, help="saves per mode")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="seconds: the tiny model, one save per mode of 1-step windows")
    args = ap.parse_args(argv)
    if args.smoke:
        args.window, args.saves = 1, 1
    scratch = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    wider = [
        "model.hidden_size=512",
        "model.intermediate_size=1408",
        "model.num_hidden_layers=8",
        "model.num_attention_heads=8",
        "model.num_key_value_heads=4",
    ]
    overrides = [
        "model=tiny",
        *(["model.vocab_size=512"] if args.smoke else wider),
        "train.seq_len=128",
        "train.micro_batch_size=2",
        "train.global_batch_tokens=256",
        "log.wandb_mode=disabled",
        "log.console=false",
        "checkpoint.keep_last=1",
        "checkpoint.resume=none",
        f"run_dir={scratch}",
    ]
    cfg = load_config(overrides)
    backend = FsdpBackend(cfg)
    model = backend.setup_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    loader = ListLoader(random_batches(cfg.train.micro_batch_size, cfg.train.seq_len, vocab=cfg.model.vocab_size))
    batches = backend.device_batches(iter(loader))  # as Trainer.fit: the varlen boundaries made on the host
    logger = CheckpointFigures(cfg)
    trainer = Trainer(cfg, backend, model, optimizer, scheduler, loader, Checkpointer(cfg, backend), logger)
    timed_steps(trainer, batches, 2)  # warm-up; the optimizer state exists from here on
    state_gb = (
        sum(t.numel() * t.element_size() for t in backend.state_dict_for_checkpoint(model, optimizer)["model"].values())
        * 3
        / 1e9
    )

    results = {}
    for mode in MODES:
        mcfg = OmegaConf.merge(cfg, {"checkpoint": {"async_mode": mode, "dir": os.path.join(scratch, mode)}})
        trainer.checkpointer = ckpt = Checkpointer(mcfg, backend, log=lambda msg: None)
        ckpt.choose_resume()
        blocked, total, with_save, without = [], [], [], []
        for _ in range(args.saves):  # interleaved, so that a change in the machine's load hits both windows
            without.append(timed_steps(trainer, batches, args.window))
            t0 = time.perf_counter()
            saved = trainer.step
            ckpt.save(saved, model, optimizer, scheduler, loader, trainer.trainer_state())
            timed_steps(trainer, batches, args.window)
            ckpt.wait()  # what is left of the write after the window would hold the next save
            with_save.append(time.perf_counter() - t0)
            report = logger.figures(ckpt, saved)
            blocked.append(report["ckpt_blocked_s"])
            total.append(report["ckpt_write_s"])
        ckpt.close()
        results[mode] = {
            "blocked_s_per_save": statistics.median(blocked),
            "save_to_commit_s": statistics.median(total),
            "steps_per_s_without_save": args.window / statistics.median(without),
            "steps_per_s_with_save": args.window / statistics.median(with_save),
        }
    backend.shutdown()
    scale = {
        "commit_s_by_ranks": {n: commit_cost(scratch, n) for n in ((8,) if args.smoke else (8, 64, 512))},
        "state_model": "tiny" if args.smoke else "llama2_70b",
        "state_gb_per_rank": {
            n: state_per_rank("tiny", n) if args.smoke else state_per_rank("llama2_70b", n)
            for n in ((8,) if args.smoke else (256, 512))
        },
    }
    shutil.rmtree(scratch, ignore_errors=True) if args.dir is None else None

    sync_blocked = results["none"]["blocked_s_per_save"]
    print(
        f"state: {state_gb:.2f} GB (fp32 weights + Adam moments), window {args.window} steps, {args.saves} saves "
        "per mode"
    )
    print(
        f"{'mode':>13} {'blocked/save':>13} {'save->commit':>13} {'steps/s w/o save':>17} {'with save':>10} "
        f"{'blocked vs sync':>16}"
    )
    for mode, r in results.items():
        r["blocked_vs_sync"] = r["blocked_s_per_save"] / sync_blocked
        r["window_with_save_vs_without"] = r["steps_per_s_with_save"] / r["steps_per_s_without_save"]
        print(
            f"{mode:>13} {r['blocked_s_per_save']:12.3f}s {r['save_to_commit_s']:12.3f}s "
            f"{r['steps_per_s_without_save']:17.3f} "
            f"{r['steps_per_s_with_save']:10.3f} {r['blocked_vs_sync']:16.3f}"
        )
    best_async = min(results["async"]["blocked_vs_sync"], results["async_pinned"]["blocked_vs_sync"])
    print(
        f"async blocks training {100 * results['async']['blocked_vs_sync']:.1f}% (async_pinned "
        f"{100 * results['async_pinned']['blocked_vs_sync']:.1f}%) as long as a synchronous save (target < 10%)"
    )
    print(
        "rank 0's commit (fsync of every file, marker, rename) of a folder written by N ranks: "
        + ", ".join(f"N={n}: {t * 1e3:.0f} ms" for n, t in scale["commit_s_by_ranks"].items())
    )
    print(
        f"{scale['state_model']} state staged per rank per save (fp32 weights + Adam moments, FSDP2 sharding on a "
        "fake group): "
        + ", ".join(
            f"{n} ranks: {gb:.2f} GB ({8 * gb:.0f} GB per 8-GPU node)" for n, gb in scale["state_gb_per_rank"].items()
        )
    )
    out = {
        "benchmark": "checkpoint",
        "state_gb": state_gb,
        "window_steps": args.window,
        "saves_per_mode": args.saves,
        "modes": results,
        "scale": scale,
        "target_async_blocked_vs_sync": 0.10,
        "met": best_async < 0.10,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "machine": platform.processor() or platform.machine(),
    }
    write_result("checkpoint", out, smoke=args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
