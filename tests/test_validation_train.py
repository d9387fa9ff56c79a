"""Validation during training through lemur-train: the smoke experiment's val/loss/code and val/loss/text, the same
values on 2 FSDP ranks as in one process, the same values after a resume, and a training stream (and losses) that
validation does not touch."""

import math

import pytest
from conftest import FAST, losses, read_metrics, run_train
from fakes import HostBackend, tiny_model

pytestmark = pytest.mark.slow  # every test here starts processes

STEPS = 10
EVAL = [*FAST, f"train.max_steps={STEPS}", "eval.every_steps=5"]


def validation(run_dir):
    """step -> the validation record (a resumed run appends; the latest record of a step wins)."""
    return {m["step"]: m for m in read_metrics(run_dir) if "val/loss" in m}


def same_values(got, ref, tol):
    keys = [k for k in ref if k.startswith(("val/loss", "val/tokens"))]
    assert len(keys) == 8 and set(keys) <= set(got)  # loss: all, 2 domains, 2 sources; tokens: all, 2 sources
    for key in keys:
        assert abs(got[key] - ref[key]) <= tol, (key, ref[key], got[key])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("val1"))
    run_train([*EVAL, f"run_dir={run_dir}"])
    return run_dir


def test_smoke_logs_validation_per_domain_and_source(one_rank):
    val = validation(one_rank)
    assert sorted(val) == [5, STEPS]
    for m in val.values():
        for key in (
            "val/loss",
            "val/loss/code",
            "val/loss/text",
            "val/loss/stdlib_code",
            "val/loss/pydoc_text",
            "val/ppl/code",
            "val/ppl/text",
            "val/tokens/stdlib_code",
            "val/tokens/pydoc_text",
        ):
            assert isinstance(m[key], float) and math.isfinite(m[key]), (key, m)
        assert m["val/ppl/code"] == pytest.approx(math.exp(m["val/loss/code"]))
        assert m["val/loss/code"] == m["val/loss/stdlib_code"]  # each domain is one source here
        tokens = m["val/tokens/stdlib_code"] + m["val/tokens/pydoc_text"]
        assert m["val/loss"] == pytest.approx(
            (m["val/loss/code"] * m["val/tokens/stdlib_code"] + m["val/loss/text"] * m["val/tokens/pydoc_text"])
            / tokens,
            rel=1e-6,
        )
    assert val[STEPS]["val/loss"] < val[5]["val/loss"], "the model learns, and the held-out loss shows it"


def test_resume_gives_the_uninterrupted_values_and_validation_leaves_training_alone(one_rank, tmp_path):
    """Steps 1-7 without validation, stopped; resumed with validation to step 10: the validation at step 10 equals
    the uninterrupted run's, and every training loss equals it bit for bit (that run evaluated at step 5)."""
    run_dir = str(tmp_path / "resumed")
    run_train([*EVAL, f"run_dir={run_dir}", "eval.every_steps=0", "train.stop_at_step=7"])
    assert not validation(run_dir)
    run_train([*EVAL, f"run_dir={run_dir}"])
    ref, got = validation(one_rank), validation(run_dir)
    assert sorted(got) == [STEPS]
    same_values(got[STEPS], ref[STEPS], 1e-6)
    assert losses(run_dir) == losses(one_rank)


def test_two_ranks_give_the_single_process_values(tok, tmp_path):
    """An lr of 1e-30 (the gate wants lr > 0) moves no fp32 weight, so the initial weights stay and what differs is
    only how validation is spread over ranks: 2 FSDP ranks log what one process computes (1e-5), and the same
    values at steps 1 and 2 (a pure function of the config)."""
    overrides = [*EVAL, "optim.lr=1e-30", "train.max_steps=2", "eval.every_steps=1"]
    run_dir = str(tmp_path / "two")
    run_train([*overrides, f"run_dir={run_dir}"], nproc=2)
    got = validation(run_dir)
    assert sorted(got) == [1, 2]
    same_values(got[2], got[1], 0.0)

    from lemur_torch.config import load_config
    from lemur_torch.data import build_loader
    from lemur_torch.validation import Validator

    cfg = load_config(overrides)
    t = cfg.train
    loader = build_loader(cfg.data, tok, t.seq_len, t.micro_batch_size, 0, 1, t.seed)
    ref = Validator(cfg, loader, HostBackend(), info=lambda line: None).run(tiny_model(cfg), 1)
    same_values(got[1], ref, 1e-5)
