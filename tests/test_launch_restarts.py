"""Crashes, hangs and nodes that start on their own, under launch/torchrun.sh:
- kill trials: SIGKILL of a rank of a 2-rank run at random steps (fixed seed), and of rank 0 in the middle of a
  synchronous and of an asynchronous save; each restart resumes from the newest complete checkpoint, leaves no
  staging folder behind, and the whole curve equals the uninterrupted run's (<= 1e-6);
- a rank that stops responding (an injected sleep) ends the run with a non-zero status and every thread's
  stack in the log, long before the sleep would end;
- two agents standing in for two nodes, each with its own pre-filled HF cache and HF_HUB_OFFLINE=1, start from
  a hub id and train from its weights (the first loss equals transformers' own model on the same batches)."""

import os
import random
import signal
from pathlib import Path

import pytest
import torch
from hub_util import fill_hf_cache, make_hub_folder
from launch_util import (
    MAX_STEPS,
    REPO,
    TRAIN_ARGS,
    assert_curves_match,
    checkpoints,
    finish,
    free_port,
    kill_session,
    last_logged_step,
    losses,
    start,
    tail,
    train_env,
    two_process_reference,
    wait_for,
    worker_pids,
)
from transformers import LlamaForCausalLM

from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.model import batch_label_tokens, token_loss_sums
from lemur_torch.parallel.base import grad_accum_steps
from lemur_torch.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow  # every test here starts processes

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"


def _complete(run_dir: Path) -> list[str]:
    return [c for c in checkpoints(run_dir) if (run_dir / "checkpoints" / c / "meta.json").exists()]


def _staging(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    return sorted(d.glob(".tmp-*")) if d.exists() else []


def test_sigkill_at_random_steps_and_during_saves_restarts_exactly(tmp_path):
    rng = random.Random(20260411)
    run_dir = tmp_path / "run"
    args = [
        "bash",
        TORCHRUN_SH,
        *TRAIN_ARGS,
        f"run_dir={run_dir}",
        "checkpoint.export_at_end=false",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=2",
    ]
    # (async_mode, where the kill lands, which rank): the save kills hit rank 0, the one that commits, while a
    # test hook holds the checkpoint open between its data and its commit
    trials = [("async", "step", rng.choice([0, 1])), ("none", "save", 0), ("async", "save", 0)]
    log_lines = []
    for i, (mode, where, rank) in enumerate(trials):
        newest_before = _complete(run_dir)[-1:] if _complete(run_dir) else []
        target = last_logged_step(run_dir) + rng.randint(1, 3)
        env = train_env(NPROC_PER_NODE="2", LEMUR_TEST_SAVE_DELAY_S="4" if where == "save" else "0")
        log = tmp_path / f"trial{i}.log"
        agent = start([*args, f"checkpoint.async_mode={mode}"], log, env)
        try:
            wait_for(lambda target=target: last_logged_step(run_dir) >= target, 300, f"step {target}", agent, log)
            if where == "save":  # the next save's data is written, its commit not yet
                wait_for(
                    lambda: any((p / ".metadata").exists() for p in _staging(run_dir)),
                    120,
                    "a save in progress",
                    agent,
                    log,
                )
                in_flight = _staging(run_dir)[0].name[len(".tmp-") :]
            pids = worker_pids(agent.pid)
            assert sorted(pids) == [0, 1], pids
            os.kill(pids[rank], signal.SIGKILL)
            rc = finish(agent, log, timeout=180)
        finally:
            if agent.poll() is None:
                kill_session(agent)
        assert rc != 0, tail(log)
        text = tail(log, 200_000)
        if newest_before:
            assert f"resumed from {run_dir / 'checkpoints' / newest_before[0]}" in text, text[-3000:]
        if where == "save":
            assert in_flight not in _complete(run_dir), f"{in_flight} was committed although rank 0 died before it"
        log_lines.append(
            f"trial {i}: async_mode={mode}, SIGKILL rank {rank} "
            f"{'during the save of ' + in_flight if where == 'save' else f'after step {target}'}"
        )

    newest = _complete(run_dir)[-1]
    log = tmp_path / "final.log"
    rc = finish(start(args, log, train_env(NPROC_PER_NODE="2")), log, timeout=300)
    assert rc == 0, tail(log)
    assert f"resumed from {run_dir / 'checkpoints' / newest}" in tail(log, 200_000)
    assert not _staging(run_dir), f"staging folders left: {_staging(run_dir)}"
    diff = assert_curves_match(losses(run_dir), two_process_reference(), tol=1e-6)
    print(
        "; ".join(log_lines)
        + f"; the final restart resumed from {newest}: all {MAX_STEPS} steps within {diff:.1e} of the uninterrupted run"
    )


def test_a_rank_that_stops_responding_ends_the_run_with_stack_dumps(tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "hang.log"
    # rank 1 sleeps 600 s before step 3; the watchdog (8 s) must end the run long before that
    env = train_env(NPROC_PER_NODE="2", LEMUR_TEST_HANG="1:3:600")
    agent = start(
        [
            "bash",
            TORCHRUN_SH,
            *TRAIN_ARGS,
            f"run_dir={run_dir}",
            "train.hang_timeout_s=8",
            "checkpoint.export_at_end=false",
        ],
        log,
        env,
    )
    rc = finish(agent, log, timeout=240)
    text = tail(log, 400_000)
    assert rc != 0 and last_logged_step(run_dir) == 2, text[-3000:]
    assert "step watchdog: no progress for train.hang_timeout_s=8s after step 2" in text, text[-3000:]
    assert "exitcode  : 125" in text or "exitcode: 125" in text, text[-3000:]
    # faulthandler's dump: the sleeping rank's main thread is in the hook, and every thread is listed
    assert "(most recent call first)" in text and "faults.py" in text and "before_step" in text, text[-3000:]


def test_two_nodes_with_their_own_offline_hf_caches_start_from_a_hub_id(tmp_path):
    hub = make_hub_folder(tmp_path / "hub" / "tiny-llama")
    repo_id = "lemur-test/tiny-llama"
    run_dir = tmp_path / "run"
    args = [
        "bash",
        TORCHRUN_SH,
        *TRAIN_ARGS,
        f"run_dir={run_dir}",
        f"model.pretrained={repo_id}",
        "train.max_steps=2",
        "checkpoint.save_at_end=false",
        "checkpoint.export_at_end=false",
    ]
    port, rdzv = str(free_port()), f"hub-{os.getpid()}"
    agents, logs = [], []
    for node in range(2):
        fill_hf_cache(tmp_path / f"node{node}-cache", repo_id, hub)
        env = train_env(
            NNODES="2",
            NPROC_PER_NODE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RDZV_ID=rdzv,
            HF_HUB_CACHE=str(tmp_path / f"node{node}-cache"),
            HF_HUB_OFFLINE="1",
        )
        logs.append(tmp_path / f"node{node}.log")
        agents.append(start(args, logs[-1], env))
    try:
        for agent, log in zip(agents, logs):
            assert finish(agent, log, timeout=300) == 0, tail(log)
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_session(agent)
    got = losses(run_dir)[1]
    expected = _first_step_loss(hub)
    assert abs(got - expected) < 1e-5, (got, expected)


def _first_step_loss(hub: Path) -> float:
    """Step 1's loss computed independently: transformers' own model from the hub folder on the two ranks' first
    micro-batches (the loader's partition of the global batch), sum of token losses over all label tokens."""
    cfg = load_config(TRAIN_ARGS)
    t = cfg.train
    model = LlamaForCausalLM.from_pretrained(hub, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for rank in range(2):
        batches = iter(
            build_loader(cfg.data, build_tokenizer(cfg.data), t.seq_len, t.micro_batch_size, rank, 2, t.seed)
        )
        for _ in range(grad_accum_steps(cfg, 2)):
            mb = next(batches)
            with torch.no_grad():
                logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            total += token_loss_sums(logits, mb["labels"], mb["domain_ids"], 2, t.loss_chunk)[0].item()
            tokens += int(batch_label_tokens(mb))
    return total / tokens
