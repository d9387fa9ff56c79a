"""Checkpoints in real training runs: several runs sharing one folder (lineage, pruning, debris of killed saves,
the resume choice, the edges of a resume), asynchronous and synchronous saves giving the same checkpoint, and a
resume on 3 ranks, which split the 32000-row vocabulary unevenly."""

import glob
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, losses, read_metrics, run_train
from fakes import ListLoader, contract_batch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lemur_torch.checkpoint import Checkpointer, read_meta, scan_checkpoints
from lemur_torch.config import load_config
from lemur_torch.metrics import MetricsLogger
from lemur_torch.optim import build_optimizer, build_scheduler, lr_lambda
from lemur_torch.parallel import save_plans
from lemur_torch.parallel.fsdp import FsdpBackend
from lemur_torch.trainer import StopSignal, Trainer

pytestmark = pytest.mark.slow  # every test here starts processes


def _names(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def _wandb_ids(run_dir: Path):
    """wandb run id of each offline run started in run_dir (one folder per wandb.init)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_runs_sharing_a_folder_keep_their_lineages(tmp_path):
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    base = [*FAST, f"run_dir={run_dir}"]
    # run A: an older run in this folder, committed with the marker protocol
    run_train(
        [*base, "train.max_steps=5", "checkpoint.every_steps=5", "checkpoint.commit=marker", "log.wandb_mode=offline"]
    )
    a_id = read_meta(str(ck / "step_00000005"))["run_id"]
    # debris of saves killed mid-write: a staging folder, and an in-place (marker) folder without its marker
    for name in (".tmp-step_00000007", "step_00000008"):
        (ck / name).mkdir()
        (ck / name / "__0_0.distcp").write_bytes(b"half a shard")

    # run B: a fresh start in the same folder, a checkpoint every step, keep_last=2
    out = run_train(
        [
            *base,
            "checkpoint.resume=none",
            "train.max_steps=3",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=2",
            "log.wandb_mode=offline",
        ]
    ).stdout
    assert "step_00000007, an interrupted save" in out and "step_00000008, incomplete" in out, out[-3000:]
    assert _names(ck) == ["step_00000002", "step_00000003", "step_00000005"], "B prunes only its own step 1"
    b_id = read_meta(str(ck / "step_00000003"))["run_id"]
    assert b_id != a_id and read_meta(str(ck / "step_00000005"))["run_id"] == a_id

    # run C: auto-resume continues B (the newest commit), not A (the highest step); C is already past its
    # stop_at_step, so it trains nothing and writes nothing
    lines = len(read_metrics(str(run_dir)))
    seq = read_meta(str(ck / "step_00000003"))["commit_seq"]
    out = run_train([*base, "train.max_steps=6", "train.stop_at_step=2"]).stdout
    assert f"resumed from {ck / 'step_00000003'} at step 3" in out, out[-3000:]
    assert len(read_metrics(str(run_dir))) == lines, "a run resumed past train.stop_at_step trained a step"
    assert _names(ck) == ["step_00000002", "step_00000003", "step_00000005"]
    assert read_meta(str(ck / "step_00000003"))["commit_seq"] == seq

    # run D: B again, with a new peak lr, betas and weight decay: the config's values apply and are reported
    new = ["optim.lr=5e-4", "optim.betas=[0.8,0.99]", "optim.weight_decay=0.05"]
    out = run_train([*base, "train.max_steps=4", *new, "log.wandb_mode=offline"]).stdout
    for key in (
        "optim.lr: 0.001 in the checkpoint -> 0.0005",
        "optim.betas: [0.9, 0.95] in the checkpoint -> [0.8, 0.99]",
        "optim.weight_decay: 0.1 in the checkpoint -> 0.05",
    ):
        assert key in out, out[-3000:]
    step4 = read_metrics(str(run_dir))[-1]
    assert step4["step"] == 4
    assert step4["lr"] == lr_lambda(3, load_config([*FAST, *new]).optim, 4) * 5e-4
    # the wandb runs follow the lineages: A has its own, B and its resume D share one
    assert sorted(_wandb_ids(run_dir)) == sorted([a_id, b_id, b_id]), (_wandb_ids(run_dir), a_id, b_id)


# -- asynchronous and synchronous saves ----------------------------------------------------------------------


def _flat_checkpoint(path: Path, scratch: Path) -> dict:
    """Everything a checkpoint holds, loaded: the DCP state (model + optimizer) as one dict, the extra state,
    every rank's rng state."""
    out = scratch / (path.parent.parent.name + "-" + path.name + ".pt")
    dcp_to_torch_save(str(path), str(out))
    flat = {"dcp": torch.load(out, weights_only=False)}
    flat["extra"] = torch.load(path / "extra_state.pt", weights_only=False)
    for f in sorted((path / "rng").iterdir()):
        flat[f"rng/{f.name}"] = torch.load(f, weights_only=False)
    return flat


def _assert_same(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_async_and_sync_saves_give_the_same_checkpoint_and_resume(tmp_path):
    common = [*FAST, "train.max_steps=4", "checkpoint.every_steps=2", "train.micro_batch_size=1"]
    # async: step 2 is written in the background while steps 3 and 4 train; it is the run's second save (every
    # step is saved), planned from the plans cached at the first (parallel/save_plans.py), while the synchronous
    # run plans its step 2, its first save, in full
    run_train(
        [
            *common,
            f"run_dir={tmp_path / 'async'}",
            "checkpoint.async_mode=async",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=4",  # step 2's is compared below
        ],
        nproc=2,
    )
    run_train([*common, f"run_dir={tmp_path / 'sync'}", "checkpoint.async_mode=none", "train.stop_at_step=2"], nproc=2)
    a, s = (tmp_path / m / "checkpoints" / "step_00000002" for m in ("async", "sync"))
    flat_a, flat_s = _flat_checkpoint(a, tmp_path), _flat_checkpoint(s, tmp_path)
    assert len(flat_a["dcp"]["model"]) > 10 and flat_a["extra"]["trainer"]["step"] == 2
    assert flat_a["extra"]["scheduler"]["last_epoch"] == 2, "the extra state is the saved step's, not a later one"
    for part in ("dcp", "rng/rank_0.pt", "rng/rank_1.pt"):
        _assert_same(flat_a[part], flat_s[part], part)
    extra_a, extra_s = (
        dict(f["extra"], trainer={k: v for k, v in f["extra"]["trainer"].items() if k != "run_id"})
        for f in (flat_a, flat_s)
    )
    _assert_same(extra_a, extra_s, "extra_state")
    # resumed from the asynchronous checkpoint (identical to the synchronous one, so from either), the losses
    # are exactly those of the uninterrupted run, which went on while its checkpoint was written
    run_train(
        [*common, f"run_dir={tmp_path / 'resumed'}", f"checkpoint.resume={a}", "checkpoint.save_at_end=false"], nproc=2
    )
    ref, got = losses(str(tmp_path / "async")), losses(str(tmp_path / "resumed"))
    assert sorted(got) == [3, 4] and [got[s] for s in (3, 4)] == [ref[s] for s in (3, 4)], (got, ref)


def _async_saves_rank(rank, size, port, run_dir, out):
    """One rank of a 2-rank gloo run saving asynchronously at every step: which process groups it creates when
    (`dist.new_group`, wrapped), and on rank 0 how many ranks sent DCP a plan at each save."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    phase, groups, usable = ["build"], [], []
    new_group, create_global_plan = dist.new_group, save_plans.CachingSavePlanner.create_global_plan
    dist.new_group = lambda *a, **k: (groups.append(phase[0]), new_group(*a, **k))[1]
    save_plans.CachingSavePlanner.create_global_plan = lambda self, plans: (
        usable.append(sum(p.usable for p in plans)),
        create_global_plan(self, plans),
    )[1]
    cfg = load_config(
        [*FAST, f"run_dir={run_dir}", "train.max_steps=4", "checkpoint.every_steps=1", "checkpoint.async_mode=async"]
    )
    backend = FsdpBackend(cfg)
    try:
        model = backend.setup_model(cfg)
        optimizer = build_optimizer(model, cfg.optim, "cpu")
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        ids = torch.arange(3, 3 + cfg.train.seq_len).repeat(cfg.train.micro_batch_size, 1)
        ckpt = Checkpointer(cfg, backend, log=lambda m: None)
        logger = MetricsLogger(cfg, enabled=False)
        trainer = Trainer(
            cfg, backend, model, optimizer, scheduler, ListLoader([contract_batch(ids)]), ckpt, logger, StopSignal()
        )
        phase[0] = "fit"
        trainer.fit()
    finally:
        backend.shutdown()
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump({"groups": groups, "usable": usable}, f)


@pytest.mark.slow
def test_async_saves_make_their_group_at_start_and_plan_once(tmp_path):
    """2 gloo ranks saving asynchronously at steps 1 to 4: the save group is made when the Checkpointer is,
    before the first step (no `dist.new_group` inside fit), and only the first save is planned from the ranks'
    plans: at the later ones no rank sends one (DCP's plan caching)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: an asynchronous save starts threads, and a child forked from this threaded process can
    # hang on a lock held at the fork (seen: a rank stuck creating the save's thread)
    mp.start_processes(
        _async_saves_rank, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    got = [pickle.load(open(tmp_path / f"{r}.pkl", "rb")) for r in range(2)]
    for rank, g in enumerate(got):
        assert "build" in g["groups"] and "fit" not in g["groups"], (rank, g["groups"])
    assert got[0]["usable"] == [2, 0, 0, 0], got[0]["usable"]
    assert got[1]["usable"] == [], "rank 1 is no coordinator"
    assert scan_checkpoints(str(tmp_path / "run" / "checkpoints"))[-1].step == 4


# -- resharding over 3 ranks ---------------------------------------------------------------------------------


def test_resume_on_three_ranks_splitting_the_vocabulary_unevenly(tmp_path):
    """32000 rows over 3 ranks: 10667 + 10667 + 10666. A 1-process checkpoint resumes on 3 ranks and matches the
    uninterrupted run."""
    common = [*FAST, "train.micro_batch_size=1", "train.global_batch_tokens=384", "train.max_steps=4"]  # 6 rows
    ref_dir, three = tmp_path / "ref", tmp_path / "three"
    run_train([*common, f"run_dir={ref_dir}", "checkpoint.every_steps=2", "checkpoint.keep_last=3"])
    run_train([*common, f"run_dir={three}", f"checkpoint.resume={ref_dir / 'checkpoints' / 'step_00000002'}"], nproc=3)
    shards = glob.glob(str(three / "checkpoints" / "step_00000004" / "*.distcp"))
    assert len(shards) == 3, shards  # and the resumed run saved on 3 ranks
    ref, got = losses(str(ref_dir)), losses(str(three))
    assert sorted(got) == [3, 4], sorted(got)
    diffs = {s: abs(got[s] - ref[s]) for s in got}
    assert max(diffs.values()) < 1e-5, diffs
    print(f"1 -> 3 ranks: max |loss diff| {max(diffs.values()):.2e} vs the uninterrupted run")
