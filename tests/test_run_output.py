"""A run says where it is: the start-of-run summary, elapsed/steps per second/ETA on the step lines, and an exit
without traceback noise (the data loader's prefetch threads used to log an AttributeError at interpreter exit)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import run_train, subprocess_env

from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.metrics import Progress, duration
from lemur_torch.model import build_meta_model, count_params
from lemur_torch.plan.cluster import resolve
from lemur_torch.plan.run import plan_run, predict_run
from lemur_torch.summary import run_summary, short_count
from lemur_torch.tokenizer import build_tokenizer
from lemur_torch.trainer import InFlight, StepMetrics, StopSignal, Trainer


@pytest.mark.slow
def test_smoke_run_prints_summary_and_eta_and_exits_cleanly(tmp_path):
    """What `make train` runs (experiment=smoke, console on, checkpoint and HF export at the end), briefly."""
    run_dir = tmp_path / "smoke"
    proc = run_train(["experiment=smoke", "train.max_steps=3", f"run_dir={run_dir}", "log.wandb_mode=disabled"])
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr and "Exception ignored" not in out + proc.stderr, proc.stderr[-3000:]
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"run smoke -> {run_dir}"))
    block = "\n".join(lines[head : head + 12])
    for row in ("model", "processes", "attention", "batch", "data", "checkpoints", "resume"):
        assert re.search(rf"^  {row}\s", block, re.M), f"no {row} row in\n{block}"
    cfg = load_config(["experiment=smoke"])
    assert f"{short_count(count_params(cfg.model))} parameters" in block  # the built model's count = the config's
    assert (
        "2 rows x 256 tokens x 1 data-parallel x 1 micro-batch(es) = 512 tokens/step; 3 steps = 1,536 tokens" in block
    )
    assert re.search(r"'stdlib_code' \(builtin_code\): \d+ documents.*90\.9% of rows", block)
    assert re.search(r"'pydoc_text' \(builtin_text\): 79 documents.*9\.1% of rows", block)
    assert "fresh start at step 0" in block and "attention    sdpa" in block and "tiny: LlamaForCausalLM" in block
    assert "fsdp on 1 process(es)" in block
    assert re.search(r"^  plan\s+no prediction for cpu$", block, re.M)
    assert "tokenizer builtin of 32,000 tokens" in block
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 3
    for line in steps:
        assert re.search(r"elapsed \S+\s+[\d.]+ steps/s\s+eta \S+", line), line
    assert steps[-1].rstrip().endswith("eta 0s")


@pytest.mark.slow
def test_loader_iterator_alive_at_exit_leaves_no_traceback():
    """An iterator still referenced when the interpreter exits is finalized after concurrent.futures has joined
    its workers; its prefetch pool's shutdown then met torn-down module globals (AttributeError ... 'Empty')."""
    script = textwrap.dedent("""
        from lemur_torch.config import load_config
        from lemur_torch.data import build_loader
        from lemur_torch.tokenizer import build_tokenizer
        cfg = load_config(["experiment=smoke", "data.read_chars=16384"])
        assert cfg.data.prefetch_threads > 0
        loader = build_loader(cfg.data, build_tokenizer(cfg.data), 64, 2, 0, 1, 1)
        KEPT = iter(loader)
        for _ in range(3):
            next(KEPT)
        print("exiting")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "exiting" in proc.stdout, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_progress_rate_and_eta(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("lemur_torch.metrics.time.perf_counter", lambda: now[0])
    p = Progress(max_steps=110, start_step=10, window=3)
    now[0] = 104.0  # the first step took 4 s (warm-up)
    first = p.update(11)
    assert first["elapsed_s"] == 4.0 and first["steps_per_s"] == 0.25 and first["eta_s"] == 99 * 4
    for step in range(12, 16):  # then 2 steps/s
        now[0] += 0.5
        stats = p.update(step)
    assert stats["steps_per_s"] == pytest.approx(2.0)  # the window (3 logged steps) has dropped the warm-up
    assert stats["eta_s"] == pytest.approx((110 - 15) / 2.0)
    assert stats["elapsed_s"] == pytest.approx(6.0)
    assert [duration(s) for s in (5, 65, 3725, 90061)] == ["5s", "1m05s", "1h02m", "1d01h"]


def test_summary_of_a_resumed_run_names_the_checkpoint_and_sources():
    cfg = load_config(
        [
            "experiment=smoke",
            "model=llama2_7b",
            "train.seq_len=4096",
            "train.global_batch_tokens=65536",
            "train.micro_batch_size=1",
            "train.max_steps=1000",
        ]
    )
    model = build_meta_model(cfg.model)
    loader = build_loader(cfg.data, build_tokenizer(cfg.data), 64, 1, 0, 1, 1)
    mesh = SimpleNamespace(mesh_dim_names=("dp_replicate", "dp_shard"), mesh=SimpleNamespace(shape=(2, 8)))
    backend = SimpleNamespace(
        world_size=16, name="fsdp", num_devices=16, device_kind="NVIDIA H100", mesh=mesh, dp_size=16
    )
    text = run_summary(
        cfg, backend, model, loader, grad_accum=1, step=250, tokens_seen=250 * 65536, resumed_from="/ckpt/step_00000250"
    )
    assert "6.74B parameters" in text  # Llama-2-7B: 6.738e9
    assert "fsdp on 16 process(es), 16 NVIDIA H100 device(s); mesh dp_replicate=2 x dp_shard=8" in text
    assert "1 rows x 4096 tokens x 16 data-parallel x 1 micro-batch(es) = 65,536 tokens/step" in text
    assert "from /ckpt/step_00000250 at step 250 (16,384,000 tokens seen); 750 steps to go" in text


def test_a_run_on_a_known_device_carries_the_plan_and_each_step_its_ratio():
    """On a device the planner's table holds, the summary's plan row is lemur-plan's prediction for the run's own
    config on the devices the backend found, and each logged step carries it and step_time_s / predicted."""
    cfg = load_config(["experiment=lemur_70b_pretrain", "log.console=false"])
    plan, line = predict_run(cfg, "NVIDIA H100 80GB HBM3", 512)
    planned = load_config(["experiment=lemur_70b_pretrain", "cluster.device=h100_sxm", "cluster.devices=512"])
    reference = plan_run(planned, resolve(planned.cluster))
    assert plan.step_time_s == reference.step_time_s and plan.memory.peak == reference.memory.peak
    assert f"{plan.step_time_s:.2f} s/step" in line and "512 x h100_sxm" in line
    assert predict_run(cfg, "cpu", 1) == (None, "no prediction for cpu")

    logged = []
    backend = SimpleNamespace(
        dp_size=512,
        device_kind="NVIDIA H100 80GB HBM3",
        num_devices=512,
        memory_stats=dict,
        device=torch.device("cpu"),
        replicated=lambda t: t,
    )
    trainer = Trainer(
        cfg,
        backend,
        model=None,
        optimizer=None,
        scheduler=SimpleNamespace(base_lrs=[4e-5], last_epoch=0),
        loader=SimpleNamespace(domain_names=["code"], stats=dict),
        checkpointer=SimpleNamespace(stats=dict),
        logger=SimpleNamespace(log_step=logged.append, enabled=True),
        stop=StopSignal(),
    )
    assert trainer.prediction == line
    metrics = StepMetrics(
        loss=1.0, grad_norm=1.0, finite=True, label_tokens=1, domain_loss={"code": 1.0}, applied_updates=1
    )
    trainer.log_step(InFlight(1, None, 0.0, 0.0, 1), metrics, 4e-5, 0.0, 2 * plan.step_time_s)
    assert logged[0]["step_time_predicted_s"] == plan.step_time_s
    assert logged[0]["step_time_vs_predicted"] == pytest.approx(2.0)
