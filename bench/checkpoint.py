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
Scale (`save_costs_at_scale`): rank 0's host time per save at 8, 64 and 512 ranks, before (DCP's defaults, a
full fsync pass at the commit) and after (cached plans, lean metadata broadcast, folders-only commit:
lemur_torch/parallel/save_plans.py, lemur_torch/commit.py), on a fake process group (FakeStore, backend "fake")
holding Llama-2-70B's real FSDP2 sharding on the meta device: the plan (rank 0's local plan, unpickling every
rank's plan, the global plan, pickling every rank's final plan), the metadata (unpickling every rank's write
results, writing .metadata, pickling what DCP broadcasts) and the commit (a folder written by N ranks: one shard
and one rng file each). Rank 0 runs its own part for real; what the other ranks send it is made from rank 0's plan
by FSDP2's dim-0 sharding, checked against a real rank's plan. Figures of the second save (the first is planned
in full either way). By default 8 of the 70B's 80 decoder layers (`--scale-layers`, 0 for all): the items per
rank shrink tenfold, the shapes, the sharding and how each figure grows with the ranks stay. Also Llama-2-70B's
state per rank at 256 and 512 ranks (the host memory each rank stages).

On this CPU-only machine the "device" is host memory: staging is a memcpy and pinned memory does not exist, so
async_pinned is the same background staging into pageable buffers as on a GPU without the pinning; the
background write competes with training for the same cores, which the with-save window shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import multiprocessing
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from results_io import TESTS, write_result  # bench/ is on sys.path: this script's folder
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.testing._internal.distributed.fake_pg import FakeStore

from lemur_torch import commit
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config
from lemur_torch.model import build_meta_model, clean_fqn
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.parallel.fsdp import FsdpBackend, apply_fsdp
from lemur_torch.parallel.save_plans import CachingSavePlanner, LeanMetadataWriter, drop_cache, new_cache_key
from lemur_torch.plan.sharding import shard_on_fake_pg
from lemur_torch.trainer import Trainer

sys.path.insert(0, TESTS)
from fakes import ListLoader, StepRecorder, random_batches  # noqa: E402  (the tests' fake loader and contract batches)

MODES = ("none", "async", "async_pinned")


class CheckpointFigures(StepRecorder):
    """A logger that keeps the checkpoint figures the trainer logs with its steps and drops the rest.
    Checkpointer.stats() hands a save's figures out once: to the first step logged after the save completed, or,
    if none was, to the next caller."""

    def __init__(self, cfg):
        super().__init__(cfg)
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


def commit_cost(scratch: str, ranks: int, files_synced: bool, shard_bytes: int = 1 << 16) -> float:
    """Seconds rank 0's commit takes (fsync of the folders, and of every file unless the writers synced them;
    marker, rename, parent fsync) for a checkpoint folder written by `ranks` ranks: one DCP shard file and one
    rng file each, plus the metadata."""
    final = os.path.join(scratch, f"commit-{ranks}-{files_synced}", "step_00000001")
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
    commit.commit(staging, final, "rename", "meta.json", b"{}", files_synced=files_synced)
    return time.perf_counter() - t0


# -- rank 0's save planning and metadata at scale, on a fake process group -------------------------------------


def rank_state(model: str, ranks: int, rank: int, layers=None):
    """Rank `rank`'s checkpointed state over `ranks` fake ranks: the model wrapped by parallel/fsdp.py's own
    apply_fsdp on the meta device, and an AdamW state of get_optimizer_state_dict's layout (a step count and two
    moments per parameter, the moments sharded as the parameter), nothing allocated. Needs the fake group."""
    layer_override = [f"model.num_hidden_layers={layers}"] if layers else []
    cfg = load_config([f"model={model}", *layer_override, "parallel.activation_checkpointing=none"])
    mesh = init_device_mesh("cpu", (ranks,), mesh_dim_names=("dp_shard",))
    model_ = build_meta_model(cfg.model)
    apply_fsdp(model_, mesh, cfg.parallel, MixedPrecisionPolicy())  # the schema's parallel group: every key
    params = {clean_fqn(n): p for n, p in model_.named_parameters()}
    optim = {n: {"step": torch.tensor(1.0), "exp_avg": p, "exp_avg_sq": p} for n, p in params.items()}
    groups = [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(params)}]
    return {"model": params, "optim": {"state": optim, "param_groups": groups}}


def local_plan(state, rank: int) -> SavePlan:
    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=rank == 0)
    return planner.create_local_plan()


def plan_of_rank(plan0: SavePlan, rank: int, ranks: int) -> SavePlan:
    """Rank `rank`'s local plan from rank 0's: FSDP2 shards every tensor on dim 0 in torch.chunk's pieces
    (ceil(rows / ranks) rows each, the last ones shorter or empty); the rest is the same on every rank."""
    items = []
    for item in plan0.items:
        if item.type == WriteItemType.SHARD:
            chunk, rows = item.tensor_data.chunk, item.tensor_data.size[0]
            per = -(-rows // ranks)
            start = min(rank * per, rows)
            offsets = torch.Size([start, *chunk.offsets[1:]])
            sizes = torch.Size([max(0, min(per, rows - start)), *chunk.sizes[1:]])
            item = dataclasses.replace(
                item,
                index=MetadataIndex(item.index.fqn, offsets, item.index.index),
                tensor_data=dataclasses.replace(item.tensor_data, chunk=ChunkStorageMetadata(offsets, sizes)),
            )
        items.append(item)
    return dataclasses.replace(plan0, items=items)


def same_plan(a: SavePlan, b: SavePlan) -> bool:
    key = lambda it: (it.index.fqn, tuple(it.index.offset or ()), it.type, it.tensor_data)  # noqa: E731
    return [key(it) for it in a.items] == [key(it) for it in b.items]


def write_results(plan: SavePlan, rank: int) -> list:
    """What rank `rank` reports after writing its final plan: where each item lies in its one file."""
    out, offset = [], 0
    for item in plan.items:
        if item.tensor_data is not None:
            t = item.tensor_data
            length = t.chunk.sizes.numel() * torch.empty((), dtype=t.properties.dtype).element_size()
        else:
            length = 4096
        out.append(WriteResult(item.index, length, _StorageInfo(f"__{rank}_0.distcp", offset, length)))
        offset += length
    return out


class Variant:
    """How a save is planned and written: main's DCP defaults ("before") or this project's ("after")."""

    def __init__(self, name: str):
        self.name, self.key = name, new_cache_key()

    def planner(self):
        return DefaultSavePlanner() if self.name == "before" else CachingSavePlanner(self.key)

    def writer(self, path: str):
        return FileSystemWriter(path) if self.name == "before" else LeanMetadataWriter(path)


def rank0_save(variant: Variant, state, sent_plans: list, sent_results: list, path: str) -> dict:
    """One save's planning and metadata as rank 0 runs them (DCP's _save_state_dict with _DistWrapper's pickled
    gather and scatter); `sent_plans` and `sent_results`: what ranks 1.. send it, pickled. Host seconds."""
    planner, writer = variant.planner(), variant.writer(path)
    t0 = time.perf_counter()
    planner.set_up_planner(state_dict=state, storage_meta=writer.storage_meta(), is_coordinator=True)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    mine = writer.prepare_local_plan(planner.create_local_plan())
    plans = [pickle.loads(b) for b in [pickle.dumps(mine), *sent_plans]]  # the gather: rank 0's own included
    central, metadata = planner.create_global_plan(plans)
    central = writer.prepare_global_plan(central)
    scattered = [pickle.dumps(p) for p in central]
    final = planner.finish_plan(pickle.loads(scattered[0]))
    t1 = time.perf_counter()
    results = [pickle.loads(b) for b in [pickle.dumps(write_results(final, 0)), *sent_results]]
    writer.finish(metadata, results)
    broadcast = pickle.dumps(metadata)  # DCP broadcasts the metadata to every rank once written
    t2 = time.perf_counter()
    pickle.loads(broadcast)
    t3 = time.perf_counter()
    return {
        "plan_s": t1 - t0,
        "metadata_s": t2 - t1,
        "broadcast_bytes": len(broadcast),
        "broadcast_load_s_per_rank": t3 - t2,
        "items_on_rank0": sum(len(p.items) for p in plans),
        "final_plan": final,
    }


def real_plan(model: str, ranks: int, rank: int, layers=None) -> bytes:
    """Rank `rank`'s own local plan, pickled. Run in a fresh (forked) process: FSDP2 reuses the device mesh of
    an earlier wrap of the same shape, so a second wrap in one process would plan as the first rank did."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
    try:
        return pickle.dumps(local_plan(rank_state(model, ranks, rank, layers), rank))
    finally:
        dist.destroy_process_group()


def forked(fn, *args):
    """fn(*args) in a forked child process of its own; its (picklable) result."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def run():
        try:
            send.send((True, fn(*args)))
        except BaseException:
            send.send((False, traceback.format_exc()))

    child = ctx.Process(target=run)
    child.start()
    send.close()  # the child's end only: a child that dies without a word ends recv with EOFError, not a hang
    try:
        ok, result = receive.recv()
    except EOFError:
        raise RuntimeError(
            f"{fn.__name__}{args}: the forked child died (exit {child.join() or child.exitcode})"
        ) from None
    child.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__}{args} failed in its forked child:\n{result}")
    return result


def save_costs_at_scale(model: str, ranks_list, scratch: str, layers=None) -> dict:
    """Rank 0's host time per save at each number of ranks, before and after (module docstring)."""
    out = {}
    ranks = min(ranks_list)
    real = {r: pickle.loads(forked(real_plan, model, ranks, r, layers)) for r in (0, 1, ranks - 1)}
    for r in (1, ranks - 1):  # the plans derived from rank 0's are the ranks' own
        assert same_plan(real[r], plan_of_rank(real[0], r, ranks)), f"rank {r}'s plan differs from the derived one"
    for ranks in ranks_list:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
        state = rank_state(model, ranks, 0, layers)
        plan0 = local_plan(state, 0)
        assert same_plan(plan0, plan_of_rank(plan0, 0, ranks)), f"rank 0 of {ranks} is not sharded as expected"
        full = [pickle.dumps(plan_of_rank(plan0, r, ranks)) for r in range(1, ranks)]
        unchanged = [pickle.dumps(SavePlan([], usable=False))] * (ranks - 1)
        row = {}
        for name in ("before", "after"):
            variant, results = Variant(name), None
            saves = []
            for n in range(2):
                # ranks 1.. send their full plans, except to a caching planner once it has them (DCP's own rule)
                sent = unchanged if (name == "after" and n > 0) else full
                if results is None:  # every rank's write results; the same at every save
                    global_plans, _ = DefaultSavePlanner().create_global_plan([plan0, *(pickle.loads(b) for b in full)])
                    results = [pickle.dumps(write_results(global_plans[r], r)) for r in range(1, ranks)]
                    del global_plans
                path = os.path.join(scratch, f"scale-{ranks}-{name}-{n}")
                saves.append(rank0_save(variant, state, sent, results, path))
                saves[-1].pop("final_plan")
                shutil.rmtree(path, ignore_errors=True)
                gc.collect()
            drop_cache(variant.key)
            row[name] = {"first_save": saves[0], "next_saves": saves[1]}
            row[name]["next_saves"]["commit_s"] = commit_cost(scratch, ranks, files_synced=name == "after")
        dist.destroy_process_group()
        out[ranks] = row
        del full, unchanged, state, plan0
        gc.collect()
    return out


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


def print_scale(model: str, at_scale: dict) -> None:
    """Rank 0's host time per save (the figures of the second save) at each number of ranks, before and after,
    and each figure's growth against the fewest ranks."""
    base = min(at_scale)
    print(f"rank 0's host time per save (after the first), {model} state on a fake process group:")
    print(
        f"{'ranks':>6} {'items':>9} {'plan before':>12} {'after':>8} {'metadata':>9} {'after':>8} "
        f"{'broadcast MB':>13} {'after':>8} {'commit before':>14} {'after':>8}"
    )
    for n, row in sorted(at_scale.items()):
        b, a = row["before"]["next_saves"], row["after"]["next_saves"]
        print(
            f"{n:>6} {b['items_on_rank0']:>9,} {b['plan_s']:11.3f}s {a['plan_s']:7.3f}s {b['metadata_s']:8.3f}s "
            f"{a['metadata_s']:7.3f}s {b['broadcast_bytes'] / 1e6:13.2f} {a['broadcast_bytes'] / 1e6:8.3f} "
            f"{b['commit_s']:13.3f}s {a['commit_s']:7.3f}s"
        )
    for key, what in (("plan_s", "plan"), ("metadata_s", "metadata"), ("commit_s", "commit")):
        for name in ("before", "after"):
            ref = at_scale[base][name]["next_saves"][key]
            ratios = ", ".join(
                f"{n}: x{row[name]['next_saves'][key] / ref:.2f}" for n, row in sorted(at_scale.items()) if n != base
            )
            print(f"  {what} {name}: vs {base} ranks {ratios}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=4, help="steps per window")
    ap.add_argument("--saves", type=int, default=3, help="saves per mode")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="seconds: the tiny model, one save per mode of 1-step windows")
    ap.add_argument("--scale-model", default="llama2_70b", help="the model whose state is planned at 8/64/512 ranks")
    ap.add_argument(
        "--scale-layers",
        type=int,
        default=8,
        help="decoder layers of that model (0: all); 8 of the 70B's 80 keep DCP's default planning at 512 ranks "
        "(156k items on rank 0, a tenth of the real 1.5M) within minutes and a few GB",
    )
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
    scale_model = "tiny" if args.smoke else args.scale_model
    scale_ranks = (8,) if args.smoke else (8, 64, 512)
    scale_layers = None if args.smoke else (args.scale_layers or None)
    at_scale = save_costs_at_scale(scale_model, scale_ranks, scratch, scale_layers)
    scale = {
        "save_model": scale_model + (f" ({scale_layers} layers)" if scale_layers else ""),
        "save_costs_by_ranks": at_scale,
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
    print_scale(scale["save_model"], at_scale)
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
