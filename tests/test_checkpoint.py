"""The checkpoint machinery in one process: the commit protocol (rename and marker), what is fsynced before a
checkpoint becomes visible, rank 0's resume choice, the export's refusal to replace what is not an export,
the optimizer hyperparameters on resume, and resolving model.pretrained from a node's HF cache."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST
from fakes import ListLoader, StepRecorder, contract_batch, list_trainer
from hub_util import fill_hf_cache, make_hub_folder
from omegaconf import OmegaConf

from lemur_torch import commit
from lemur_torch import trainer as trainer_lib
from lemur_torch.checkpoint import META, STEP_DIR, Checkpointer, read_meta, scan_checkpoints
from lemur_torch.config import load_config
from lemur_torch.errors import ConfigError, Preempted
from lemur_torch.export import EXPORT_MARKER, check_export_target
from lemur_torch.optim import apply_config_on_resume, build_optimizer, build_scheduler, lr_lambda
from lemur_torch.parallel.base import Backend
from lemur_torch.parallel.fsdp import FsdpBackend

# -- commit protocol -----------------------------------------------------------------------------------------


def _write_checkpoint(directory: Path, step: int, mode: str, run_id="r1", seq=1, complete=True) -> Path:
    final = directory / f"step_{step:08d}"
    staging = Path(commit.begin(str(final), mode, META))
    (staging / "data.bin").write_bytes(b"x" * 100)
    if complete:
        commit.commit(
            str(staging),
            str(final),
            mode,
            META,
            json.dumps({"step": step, "run_id": run_id, "commit_seq": seq}).encode(),
        )
    return final


@pytest.mark.parametrize("mode", ["rename", "marker"])
def test_commit_marks_complete_and_recover_cleans_the_rest(tmp_path, mode):
    logs = []
    done = _write_checkpoint(tmp_path, 1, mode)
    assert commit.is_complete(str(done), META) and not list(tmp_path.glob(".tmp-*"))
    # an interrupted save: its folder has no marker (rename: under .tmp-, marker: under the final name)
    _write_checkpoint(tmp_path, 2, mode, complete=False)
    # an interrupted delete (the marker goes first) and a commit interrupted after its marker, before the rename
    half_deleted = _write_checkpoint(tmp_path, 3, mode)
    os.remove(half_deleted / META)
    (tmp_path / ".tmp-step_00000004").mkdir()
    (tmp_path / ".tmp-step_00000004" / "data.bin").write_bytes(b"y")
    (tmp_path / ".tmp-step_00000004" / META).write_text(json.dumps({"step": 4, "run_id": "r1", "commit_seq": 2}))
    (tmp_path / "notes").mkdir()  # not ours: never touched
    assert [c.step for c in scan_checkpoints(str(tmp_path))] == [1], "only folders with their marker are checkpoints"
    commit.recover(str(tmp_path), META, STEP_DIR, logs.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_00000001", "step_00000004"]
    assert [c.step for c in scan_checkpoints(str(tmp_path))] == [1, 4]
    assert (tmp_path / "step_00000004" / "data.bin").read_bytes() == b"y"
    text = "\n".join(logs)
    assert "interrupted save" in text and "finished the interrupted commit" in text and "step_00000003" in text, text


def test_replacing_a_checkpoint_never_leaves_it_looking_complete(tmp_path):
    """rename mode: a crash between removing the old folder and renaming the new one rolls forward at start."""
    _write_checkpoint(tmp_path, 5, "rename", run_id="old")
    staging = Path(commit.begin(str(tmp_path / "step_00000005"), "rename", META))
    (staging / "data.bin").write_bytes(b"new")
    (staging / META).write_text(json.dumps({"step": 5, "run_id": "new", "commit_seq": 2}))
    commit.remove(str(tmp_path / "step_00000005"), META)  # ... and the process dies here
    commit.recover(str(tmp_path), META, STEP_DIR, lambda m: None)
    assert read_meta(str(tmp_path / "step_00000005"))["run_id"] == "new"


# -- a real save, in this process (1-rank gloo group) --------------------------------------------------------


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    cfg = load_config([*FAST, f"run_dir={tmp_path_factory.mktemp('inproc')}", "model.num_hidden_layers=1"])
    backend = FsdpBackend(cfg)
    model = backend.setup_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    model(input_ids=torch.arange(3, 19).view(1, 16)).logits.sum().backward()
    optimizer.step()  # so the optimizer has state to save
    scheduler.step()
    yield cfg, backend, model, optimizer, scheduler
    backend.shutdown()


def _checkpointer(cfg, backend, tmp_path, **ckpt):
    cfg = OmegaConf.merge(cfg, {"checkpoint": {"dir": str(tmp_path / "ckpt"), **ckpt}})
    c = Checkpointer(cfg, backend, log=lambda m: None)
    c.choose_resume()
    return c


@pytest.mark.parametrize("mode,async_mode", [("rename", "none"), ("rename", "async"), ("marker", "async_pinned")])
def test_every_file_and_folder_is_fsynced_before_the_commit(parts, tmp_path, monkeypatch, mode, async_mode):
    cfg, backend, model, optimizer, scheduler = parts
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a), str(b))), real_rename(a, b))[1])
    ckpt = _checkpointer(cfg, backend, tmp_path, commit=mode, async_mode=async_mode)
    ckpt.save(7, model, optimizer, scheduler, ListLoader(), {"step": 7, "tokens_seen": 0, "run_id": ckpt.run_id})
    ckpt.wait()
    ckpt.close()
    final = tmp_path / "ckpt" / "step_00000007"
    staging = final if mode == "marker" else tmp_path / "ckpt" / ".tmp-step_00000007"
    written = [p for p in final.rglob("*")] + [final]
    assert {"meta.json", "extra_state.pt", "config.yaml", ".metadata", "rng"} <= {p.name for p in written}
    synced = []
    for e in events:
        if e[0] == "fsync":
            synced.append(e[1])
        elif e[0] == "rename" and e[1] in synced:  # fsynced, then renamed into place (DCP's .metadata)
            synced.append(e[2])
    marker_at = synced.index(str(staging / META))
    for p in written:
        if p.name != META:
            before = str(staging / p.relative_to(final)) if p != final else str(staging)
            assert before in synced[:marker_at], (
                f"{p.relative_to(final.parent)} not fsynced before {META} ({mode}, {async_mode})"
            )
    if mode == "rename":
        (rename_at,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final)]
        assert events.index(("fsync", str(staging / META))) < rename_at
        assert ("fsync", str(final.parent)) in events[rename_at:], "the rename itself must be made durable"


def test_marker_committed_checkpoint_loads_and_one_without_marker_is_ignored(parts, tmp_path):
    cfg, backend, model, optimizer, scheduler = parts
    ckpt = _checkpointer(cfg, backend, tmp_path, commit="marker", async_mode="async")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    loader = ListLoader()
    loader.pos = 11
    ckpt.save(3, model, optimizer, scheduler, loader, {"step": 3, "tokens_seen": 30, "run_id": ckpt.run_id})
    ckpt.wait()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # a later save that dies before its marker: the folder exists under its final name, without meta.json
    incomplete = tmp_path / "ckpt" / "step_00000004"
    incomplete.mkdir()
    (incomplete / "__0_0.distcp").write_bytes(b"partial")
    again = _checkpointer(cfg, backend, tmp_path, commit="marker")
    assert not incomplete.exists(), "an incomplete marker-mode folder is cleaned up at start like a stale .tmp"
    choice = again.choose_resume()
    assert choice.path == str(tmp_path / "ckpt" / "step_00000003") and choice.run_id == ckpt.run_id
    fresh = ListLoader()
    state = again.load(choice.path, model, optimizer, scheduler, fresh)
    assert state["step"] == 3 and fresh.pos == 11
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


# -- rank 0 chooses the resume checkpoint --------------------------------------------------------------------


class FakeRank(Backend):
    """Rank 1 of 2, whose broadcast_object delivers what rank 0 sent."""

    rank, world_size = 1, 2
    device = torch.device("cpu")

    def __init__(self, from_rank0):
        self.from_rank0 = from_rank0

    def broadcast_object(self, obj):
        assert obj is None, "only rank 0's value may be broadcast"
        return self.from_rank0

    setup_model = device_batches = all_reduce_sum = clip_grad_norm_ = None
    state_dict_for_checkpoint = load_state_dict_from_checkpoint = dcp_save = dcp_load = export_hf = None


def test_every_rank_resumes_from_rank_0s_choice(tmp_path):
    """A node with a stale view of the file system (here: without the newest checkpoint) loads what rank 0 chose."""
    shared = tmp_path / "shared"
    _write_checkpoint(shared, 2, "rename", seq=1)
    newest = _write_checkpoint(shared, 4, "rename", seq=2)
    stale_view = tmp_path / "stale"
    _write_checkpoint(stale_view, 2, "rename", seq=1)
    cfg = load_config([*FAST, f"checkpoint.dir={stale_view}"])
    choice = Checkpointer(cfg, FakeRank({"path": str(newest), "run_id": "r1"})).choose_resume()
    assert choice.path == str(newest)
    with pytest.raises(ConfigError, match="checkpoint.resume"):  # rank 0's error reaches every rank
        Checkpointer(cfg, FakeRank({"error": "x is not a complete checkpoint"})).choose_resume()


# -- the export never replaces what is not an export ---------------------------------------------------------


def test_export_target_refuses_run_checkpoint_and_foreign_folders(tmp_path):
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "step_00000002" / META).write_text("{}")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    earlier = tmp_path / "earlier_export"
    earlier.mkdir()
    (earlier / EXPORT_MARKER).write_text("{}")
    (tmp_path / "empty").mkdir()
    for bad in (run, tmp_path, ckpt, ckpt / "step_00000002", ckpt / "hf", precious):
        with pytest.raises(ConfigError, match="checkpoint.export_dir") as info:
            check_export_target(str(bad), str(run), str(ckpt))
        assert "\n" not in str(info.value)
    for ok in (run / "hf", earlier, tmp_path / "empty", tmp_path / "new"):
        check_export_target(str(ok), str(run), str(ckpt))


# -- optimizer hyperparameters on resume ---------------------------------------------------------------------


def test_changed_optim_settings_apply_on_resume_and_are_reported():
    old = load_config(
        ["optim.lr=1e-3", "optim.betas=[0.9,0.95]", "optim.weight_decay=0.1", "optim.warmup_steps=2"]
    ).optim
    new = load_config(
        ["optim.lr=4e-4", "optim.betas=[0.8,0.99]", "optim.weight_decay=0.02", "optim.warmup_steps=2"]
    ).optim
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt, sched = build_optimizer(model, old, "cpu"), build_scheduler(build_optimizer(model, old, "cpu"), old, 50)
    opt = sched.optimizer
    for _ in range(5):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    opt2 = build_optimizer(model, new, "cpu")
    sched2 = build_scheduler(opt2, new, 50)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95), "loading restores the checkpoint's values..."
    changes = apply_config_on_resume(opt2, sched2, new)
    assert len(changes) == 3 and all(
        c.startswith(("optim.lr", "optim.betas", "optim.weight_decay")) for c in changes
    ), changes
    decay, no_decay = opt2.param_groups
    assert tuple(decay["betas"]) == (0.8, 0.99) and decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    expected = 4e-4 * lr_lambda(5, new, 50)
    assert (
        sched2.last_epoch == 5
        and sched2.get_last_lr()[0] == pytest.approx(expected)
        and decay["lr"] == pytest.approx(expected)
    )
    sched2.step()
    assert sched2.get_last_lr()[0] == pytest.approx(4e-4 * lr_lambda(6, new, 50))
    assert apply_config_on_resume(opt2, sched2, new) == [], "nothing to report when nothing changed"


@pytest.mark.parametrize("saved_impl", ["foreach", "for_loop"])
def test_a_checkpoint_of_another_adamw_resumes_into_this_runs_kernel(saved_impl):
    """An older run's foreach AdamW, or the XLA backend's capturable for_loop: loading its state brings back its
    implementation flags, under which the device-side guard fails (torch: "Expected grad_scale and found_inf to
    be None"). After the resume rule this run's fused AdamW steps, skips on the guard, and the change is said.
    Reference: a fused AdamW given the same state by hand."""
    ocfg = load_config(["optim.warmup_steps=2"]).optim
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=saved_impl == "foreach")
    model(torch.ones(2, 16)).sum().backward()
    old.step()
    saved = old.state_dict()
    if saved_impl == "for_loop":  # as the XLA backend saves it (capturable cannot step on the CPU)
        saved["param_groups"][0]["capturable"] = True
    opt = build_optimizer(model, ocfg, "cpu")
    sched = build_scheduler(opt, ocfg, 50)
    opt.load_state_dict({"state": saved["state"], "param_groups": [dict(g) for g in opt.state_dict()["param_groups"]]})
    for group in opt.param_groups:
        group.update({k: v for k, v in saved["param_groups"][0].items() if k in ("fused", "foreach", "capturable")})
    changes = apply_config_on_resume(opt, sched, ocfg)
    assert any(c.startswith("optimizer: the checkpoint's AdamW") for c in changes), changes
    assert all(g["fused"] and not g["foreach"] for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    # the FSDP backend's optimizer_step is the base class's, which uses no state of the backend
    Backend.optimizer_step(None, opt, torch.tensor(False))  # skipped on the guard
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    Backend.optimizer_step(None, opt, torch.tensor(True))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert apply_config_on_resume(opt, sched, ocfg) == [], "nothing to report once the flags are this run's"


# -- model.pretrained from each node's HF cache --------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return make_hub_folder(tmp_path_factory.mktemp("hub") / "tiny-llama")


def test_pretrained_from_offline_cache_and_one_line_errors(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lemur_torch.weights import resolve_pretrained

    cache = tmp_path / "cache"
    snapshot = fill_hf_cache(cache, "lemur-test/tiny-llama", hub)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_pretrained("lemur-test/tiny-llama") == str(snapshot)
    assert resolve_pretrained(str(hub)) == str(hub)
    shard = sorted(snapshot.glob("model-*.safetensors"))[-1]
    shard.unlink()  # an interrupted download
    for name, what in (
        ("lemur-test/tiny-llama", "HF_HUB_OFFLINE=1"),
        ("lemur-test/absent", "HF_HUB_OFFLINE=1"),
        ("./no/such/folder", "no such folder"),
        (str(snapshot), shard.name),
    ):
        with pytest.raises(ConfigError, match="model.pretrained") as info:
            resolve_pretrained(name)
        assert what in str(info.value) and "\n" not in str(info.value), str(info.value)


def _resolve_on_node(cache: str, hub: str, repo_id: str, queue) -> None:
    """One process of a node (forked): resolve `repo_id` online with its node's HF cache, where the download is
    a stand-in that takes a second, copies the hub folder into the cache as a download does, and counts itself."""

    import huggingface_hub
    from huggingface_hub import constants

    from lemur_torch.weights import resolve_pretrained

    real = huggingface_hub.snapshot_download

    def download(repo, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo, allow_patterns=allow_patterns, local_files_only=True, **kwargs)
        with open(os.path.join(cache, "downloads.log"), "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # a download takes a while: the node's other processes must wait, not start their own
        return str(fill_hf_cache(Path(cache), repo, Path(hub)))

    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = cache, False
    huggingface_hub.snapshot_download = download
    try:
        queue.put(resolve_pretrained(repo_id))
    except Exception as exc:  # noqa: BLE001
        queue.put(f"error: {exc!r}")


@pytest.mark.slow
def test_pretrained_is_fetched_once_per_node(hub, tmp_path):
    """4 processes on 2 "nodes" (one HF cache each), online: one download per node, the others wait on the lock."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the children inherit this process's imports: no torch import each
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_resolve_on_node, args=(str(tmp_path / f"node{n}"), str(hub), "lemur-test/tiny-llama", queue)
        )
        for n in (0, 0, 1, 1)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert not [r for r in results if r.startswith("error")], results
    for node in range(2):
        downloads = (tmp_path / f"node{node}" / "downloads.log").read_text().splitlines()
        assert len(downloads) == 1, f"node {node}: {len(downloads)} downloads"
        assert (
            results.count(
                str(
                    tmp_path
                    / f"node{node}"
                    / "models--lemur-test--tiny-llama"
                    / "snapshots"
                    / "0123456789abcdef0123456789abcdef01234567"
                )
            )
            == 2
        ), results


# -- the trainer's one-step-late read ------------------------------------------------------------------------


def test_one_step_late_read_keeps_guard_and_schedule_exact(parts, monkeypatch):
    """Trainer.fit reads step k's metrics during step k+1 (no host sync per step), and step k+1's update does not
    wait for that read: the lr each update is applied with counts only the updates applied before it (a skipped
    step does not advance the schedule; counted on the device), the skip counter is exact, and a checkpoint
    taken after step k holds a schedule that has seen step k. Reference: a fresh scheduler stepped once per
    applied update."""
    cfg, backend, model, _, _ = parts
    t = list_trainer(cfg, backend, model)
    scheduler = t.scheduler
    nonfinite = {2, 3, 5}  # steps whose loss is made non-finite
    real_loss = trainer_lib.token_loss_sums

    def loss_sums(*args):
        s, ds, dc = real_loss(*args)
        return (s * float("nan") if t.step + 1 in nonfinite else s), ds, dc

    monkeypatch.setattr(trainer_lib, "token_loss_sums", loss_sums)
    applied_lrs = []
    step_fn = backend.optimizer_step
    monkeypatch.setattr(
        backend,
        "optimizer_step",
        # the lr each update is applied with: a device tensor (lemur_torch.optim.DeviceLR), read here for the test
        lambda opt, finite: (applied_lrs.append(float(opt.param_groups[0]["lr"])), step_fn(opt, finite))[1],
    )
    ids = torch.arange(3, 3 + cfg.train.seq_len).repeat(cfg.train.micro_batch_size, 1)
    mb = contract_batch(ids)
    for _ in range(6):
        t.train_step([mb] * t.grad_accum)
    t.settle()  # as fit() does before a checkpoint or at the end
    ref = build_scheduler(build_optimizer(model, cfg.optim, "cpu"), cfg.optim, cfg.train.max_steps)
    expected = []
    for step in range(1, 7):
        expected.append(ref.get_last_lr()[0])
        if step not in nonfinite:
            ref.step()  # (torch warns that no optimizer.step() came first: this scheduler only counts)
    assert applied_lrs == pytest.approx(expected, rel=0, abs=0), (applied_lrs, expected)
    assert len(set(expected)) > 2, "the warmup must make the lrs differ, or the test proves nothing"
    assert t.skipped_steps == 3 and t.consecutive_nonfinite == 0
    assert scheduler.state_dict()["last_epoch"] == ref.state_dict()["last_epoch"] == 3


class LossLog(StepRecorder):
    """Each step's loss."""

    @property
    def losses(self):
        return {step: m["loss"] for step, m in self.steps.items()}


@pytest.mark.parametrize(
    "async_mode,when", [("none", "in the save call"), ("async", "in the save call"), ("async", "in the next step")]
)
def test_a_stop_during_a_save_ends_the_run_on_that_save_and_resumes_exactly(
    parts, tmp_path, monkeypatch, async_mode, when
):
    """A stop signal that comes while step 2's scheduled checkpoint is being saved (during the save call, or while
    an asynchronous save is still written in the background as step 3 trains): the run ends on that checkpoint,
    committed when fit returns, without saving again; resumed from it, steps 3 and 4 have the losses of a run
    that was never stopped."""
    cfg, backend, model, _, _ = parts
    cfg = OmegaConf.merge(
        cfg,
        {
            "train": {"max_steps": 4},
            "log": {"every_steps": 1},
            "checkpoint": {"every_steps": 2, "dir": str(tmp_path / "ckpt"), "async_mode": async_mode},
        },
    )
    # the commit comes 2 s after the data (in the background when asynchronous): longer than a tiny step
    monkeypatch.setenv("LEMUR_TEST_SAVE_DELAY_S", "2")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = [torch.arange(s, s + cfg.train.seq_len).repeat(cfg.train.micro_batch_size, 1) for s in (3, 300, 70)]

    def trainer(run_cfg, stop):
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)  # the fixture's backward left gradients
        optimizer = build_optimizer(model, run_cfg.optim, "cpu")
        scheduler = build_scheduler(optimizer, run_cfg.optim, run_cfg.train.max_steps)
        ckpt = Checkpointer(run_cfg, backend, log=lambda m: None)
        loader = ListLoader([contract_batch(i) for i in ids])
        return trainer_lib.Trainer(
            run_cfg, backend, model, optimizer, scheduler, loader, ckpt, LossLog(run_cfg), stop=stop
        )

    ref = trainer(OmegaConf.merge(cfg, {"checkpoint": {"every_steps": 0, "dir": str(tmp_path / "ref")}}), None)
    ref.fit()
    stop = trainer_lib.StopSignal()
    t = trainer(cfg, stop)
    saved, real_save, real_step = [], t.checkpointer.save, t.train_step

    def save(step, *args):
        saved.append(step)
        final = real_save(step, *args)
        stop.requested = when == "in the save call"  # asynchronous: the data is still being written
        return final

    def train_step(*args, **kwargs):
        real_step(*args, **kwargs)
        stop.requested = stop.requested or (when == "in the next step" and t.step == 3)

    monkeypatch.setattr(t.checkpointer, "save", save)
    monkeypatch.setattr(t, "train_step", train_step)
    with pytest.raises(Preempted) as stopped:
        t.fit()
    assert stopped.value.step == 2 and saved == [2], (stopped.value.step, t.step, saved)
    assert [c.step for c in scan_checkpoints(str(tmp_path / "ckpt"))] == [2], "committed before fit returned"
    resumed = trainer(cfg, trainer_lib.StopSignal())
    resumed.fit()
    assert resumed.resumed_from is not None and resumed.step == 4
    assert [resumed.logger.losses[s] for s in (3, 4)] == [ref.logger.losses[s] for s in (3, 4)], (
        resumed.logger.losses,
        ref.logger.losses,
    )
