"""Validation under parallel=xla_spmd (4 CPU PJRT devices): the values of the plain eager computation, one graph
per validation micro-batch compiled at the first evaluation only, and training steps that keep their one graph."""

import math
import os

import pytest
from xla_helpers import XLA, artifacts, run_xla

STEPS = 4
# an lr of 1e-30 (the gate wants lr > 0) moves no fp32 weight: the initial weights stay, so the eager reference
# needs no training loop, and every evaluation must agree
RUN = [
    *XLA,
    f"train.max_steps={STEPS}",
    "optim.lr=1e-30",
    "eval.every_steps=2",
    "eval.batches=1",
    "checkpoint.every_steps=0",
    "checkpoint.save_at_end=false",
    "checkpoint.export_at_end=false",
]


@pytest.fixture(scope="module")
def run():
    run_dir = os.path.join(artifacts(), "validation")
    results = run_xla(os.path.join(artifacts(), "validation.json"), [*RUN, f"run_dir={run_dir}"])
    from conftest import read_metrics

    return results, {m["step"]: m for m in read_metrics(run_dir) if "val/loss" in m}


def test_values_match_the_eager_computation(run):
    from fakes import HostBackend, tiny_model

    from lemur_torch.config import load_config
    from lemur_torch.data import build_loader
    from lemur_torch.tokenizer import load_tokenizer
    from lemur_torch.validation import Validator

    _, val = run
    assert sorted(val) == [2, STEPS]
    cfg = load_config([o for o in RUN if not o.startswith("parallel")])
    t = cfg.train
    loader = build_loader(cfg.data, load_tokenizer(cfg.data.tokenizer), t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    ref = Validator(cfg, loader, HostBackend(), info=lambda line: None).run(tiny_model(cfg), 2)
    for step in val:
        for key in ("val/loss", "val/loss/code", "val/loss/text", "val/tokens/stdlib_code", "val/tokens/pydoc_text"):
            assert math.isfinite(val[step][key]) and abs(val[step][key] - ref[key]) < 1e-4, (
                step,
                key,
                val[step][key],
                ref[key],
            )


def test_one_graph_per_validation_micro_batch_and_training_steps_keep_theirs(run):
    results, _ = run
    steps, evals = results["steps"], results["evals"]
    assert len(steps) == STEPS
    per_eval = len(evals) // 2
    assert per_eval >= 2 and [e["after_step"] for e in evals] == [2] * per_eval + [STEPS] * per_eval
    # executions: one per training step, one per validation micro-batch, nothing else
    execs = [s["executions"] for s in steps]
    assert [b - a for a, b in zip(execs, execs[1:])] == [1, 1 + per_eval, 1], execs
    first, second = evals[:per_eval], evals[per_eval:]
    assert [b["executions"] - a["executions"] for a, b in zip(first, first[1:])] == [1] * (per_eval - 1)
    # the second evaluation compiles nothing, and neither do the training steps around the first one
    assert all(e["compiles"] == first[-1]["compiles"] for e in second)
    assert steps[2]["compiles"] == first[-1]["compiles"] == steps[-1]["compiles"]
