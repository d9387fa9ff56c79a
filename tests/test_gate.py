"""The gate: every bad input a run can be given ends in one stderr line naming the key, exit status 2, before the
process group or any model exists (src/lemur_torch/preflight.py, config/, train.py).

Most cases go through `lemur_torch.train.main` in this process, with `build_and_fit` (the first thing that
builds a process group or a model) replaced by a tripwire; a few run as real subprocesses, and one under
torchrun with two ranks, where the line must appear once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from conftest import run_python, subprocess_env

from lemur_torch import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad inputs on disk: a model folder of another architecture, one of another family, checkpoints that are
    incomplete or of another model, a folder that holds no tokenizer."""
    root = tmp_path_factory.mktemp("inputs")

    def model_dir(name, **config):
        d = root / name
        d.mkdir()
        base = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 32000,
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        (d / "config.json").write_text(json.dumps({**base, **config}))
        (d / "model.safetensors").write_bytes(b"")  # never read: the gate looks at config.json only
        return str(d)

    ckpts = root / "ckpts"
    (ckpts / "step_00000005").mkdir(parents=True)  # an interrupted save: no meta.json
    other = root / "other_model_ckpts" / "step_00000007"
    other.mkdir(parents=True)
    (other / "meta.json").write_text("{}")
    (other / "config.yaml").write_text("model:\n  hidden_size: 256\n  num_hidden_layers: 4\n")
    (root / "no_tokenizer").mkdir()
    (root / "empty_dir").mkdir()
    return {
        "wide": model_dir("wide", hidden_size=256),
        "mistral": model_dir("mistral", model_type="mistral", architectures=["MistralForCausalLM"]),
        "incomplete": str(ckpts / "step_00000005"),
        "other_ckpts": str(other.parent),
        "no_tokenizer": str(root / "no_tokenizer"),
        "empty_dir": str(root / "empty_dir"),
    }


# (overrides, the key the line must name); @name is replaced by the path `inputs` made for it
CASES = [
    # the thirteen settings of issue 13
    (["train.seq_len=abc"], "train.seq_len"),
    (["data.sources.stdlib_code.weight=-1"], "data.sources.stdlib_code.weight"),
    (["data.sources.stdlib_code.kind=csv"], "data.sources.stdlib_code.kind"),
    (["checkpoint.resume=/nonexistent/step_00000100"], "checkpoint.resume"),
    (["data.tokenizer=/nonexistent"], "data.tokenizer"),
    (["log.peak_flops=fast"], "log.peak_flops"),
    (["log.every_steps=0"], "log.every_steps"),
    (["train.grad_clip=0"], "train.grad_clip"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
    (["train.loss_chunk=0"], "train.loss_chunk"),
    (["train.no_such_key=1"], "train.no_such_key"),
    (["model.attention=flash"], "model.attention"),
    # other unchecked ranges
    (["train.loss_chunk=-5"], "train.loss_chunk"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.stop_at_step=0"], "train.stop_at_step"),
    (["train.preempt_exit_code=2"], "train.preempt_exit_code"),
    (["optim.lr=-1e-4"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["optim.betas=[0.9,1.5]"], "optim.betas"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    (["parallel.dp_replicate=0"], "parallel.dp_replicate"),
    (["parallel.ac_every_n=0"], "parallel.ac_every_n"),
    (["data.lanes=0"], "data.lanes"),
    (["data.read_chars=0"], "data.read_chars"),
    (["model.rms_norm_eps=0"], "model.rms_norm_eps"),
    (["model.hidden_act=gelu_x"], "model.hidden_act"),
    # choices, composition and combinations
    (["model=llama2_8b"], "model"),
    (["checkpoint.export_dtype=int8"], "checkpoint.export_dtype"),
    (["log.wandb_mode=sometimes"], "log.wandb_mode"),
    (["train.seq_len=${oops}"], "train.seq_len"),
    (["train.seq_len=="], "train.seq_len"),
    (["train.seq_len=8192"], "train.seq_len"),
    (["train.global_batch_tokens=1000"], "train.global_batch_tokens"),
    (["data.format=tweets"], "data.format"),
    # inputs on disk
    (
        ["++data.sources={more: {kind: jsonl, domain: code, weight: 1, path: /nonexistent/*.jsonl}}"],
        "data.sources.more.path",
    ),
    (["++data.sources={more: {kind: text, domain: text, weight: 1, path: @empty_dir}}"], "data.sources.more.path"),
    (
        ["++data.sources={more: {kind: hf, domain: text, weight: 1, path: ./no_such_dataset_dir}}"],
        "data.sources.more.path",
    ),
    (
        ["++data.sources={more: {kind: hf, domain: text, weight: 1, path: json, data_files: /nonexistent/x.jsonl}}"],
        "data.sources.more.data_files",
    ),
    (["data.sources.stdlib_code.domain=''"], "data.sources.stdlib_code.domain"),
    (
        ["++eval.sources={held: {kind: jsonl, domain: code, path: /nonexistent/*.jsonl}}", "eval.every_steps=5"],
        "eval.sources.held.path",
    ),
    (["data.holdout=1.5"], "data.holdout"),
    (["eval.batches=0"], "eval.batches"),
    (
        ["+data.sources.more={kind: jsonl, domain: code, path: /x.jsonl}"],
        "data.sources.more",
    ),  # OmegaConf cannot; says how
    (["data.tokenizer=@no_tokenizer"], "data.tokenizer"),
    (["data.tokenizer=not a hub id"], "data.tokenizer"),
    (["model.vocab_size=31000"], "model.vocab_size"),
    (["model.pretrained=/nonexistent/llama"], "model.pretrained"),
    (["model.pretrained=@wide"], "model.hidden_size"),
    (["model.pretrained=@mistral"], "model.pretrained"),
    (["checkpoint.resume=@incomplete"], "checkpoint.resume"),
    (["checkpoint.dir=@other_ckpts"], "model.hidden_size"),
    # the chat stage
    (["experiment=chat_smoke", "model.vocab_size=32000"], "model.vocab_size"),
    (["experiment=chat_smoke", "data.sources.pydoc_qa.chat_format=xml"], "data.sources.pydoc_qa.chat_format"),
    (["experiment=chat_smoke", "data.sources.pydoc_qa.path=pydoc"], "data.sources.pydoc_qa.path"),
    (["experiment=chat_smoke", "+data.sources.pydoc_qa.fields.question=q"], "data.sources.pydoc_qa.fields.question"),
    (["experiment=chat_smoke", "data.sources.pydoc_qa.kind=parquet"], "data.sources.pydoc_qa.kind"),
    (["experiment=chat_smoke", "data.chat_packing=stacked"], "data.chat_packing"),
]

# the issue's cases whose old failure was a traceback, checked again as real processes
SUBPROCESS_CASES = [
    (["train.seq_len=abc"], "train.seq_len"),
    (["data.tokenizer=/nonexistent"], "data.tokenizer"),
    (["data.sources.stdlib_code.weight=-1"], "data.sources.stdlib_code.weight"),
]


def _fill(overrides, inputs):
    for name, path in inputs.items():
        overrides = [o.replace(f"@{name}", path) for o in overrides]
    return overrides


def _one_line(err: str, key: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one stderr line, got:\n{err}"
    assert f"'{key}'" in lines[0], f"the line does not name {key}: {lines[0]}"
    return lines[0]


def test_table_has_the_issues_cases_and_enough_of_them():
    keys = {key for _, key in CASES}
    assert len(CASES) >= 20
    for key in (
        "train.seq_len",
        "data.sources.stdlib_code.weight",
        "data.sources.stdlib_code.kind",
        "checkpoint.resume",
        "data.tokenizer",
        "log.peak_flops",
        "log.every_steps",
        "train.grad_clip",
        "train.max_nonfinite_steps",
        "train.loss_chunk",
        "model.pretrained",
    ):
        assert key in keys


@pytest.mark.parametrize("overrides,key", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_anything_is_built(overrides, key, inputs, tmp_path, capsys, monkeypatch):
    def tripwire(cfg):
        raise AssertionError("the gate let the run through to build_and_fit (process group, model)")

    monkeypatch.setattr(train, "build_and_fit", tripwire)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    args = _fill(overrides, inputs)
    t0 = time.perf_counter()
    status = train.main([*args, f"run_dir={run_dir}", "log.wandb_mode=disabled"])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert status == 2, err
    _one_line(err, key)
    assert not os.path.exists(run_dir), "nothing may be written for a run that does not start"
    assert not dist.is_initialized()
    print(f"gate {key}: {elapsed:.2f}s")


@pytest.mark.parametrize("overrides,key", SUBPROCESS_CASES, ids=[o[0] for o, _ in SUBPROCESS_CASES])
@pytest.mark.slow
def test_bad_input_as_a_process(overrides, key, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(["-m", "lemur_torch.train", *overrides, f"run_dir={run_dir}"], timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr, key)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not os.path.exists(run_dir)
    if key == "data.tokenizer":  # the old message was a hub repo-id traceback
        assert "/nonexistent" in line and "repo" not in line.lower()


@pytest.mark.slow
def test_bad_record_with_strict_data_is_one_line_naming_file_and_line(tmp_path):
    """Found after the gate, in a DataLoader worker: still one line (file:line), exit 2, no traceback."""
    fixture = os.path.join(ROOT, "tests", "fixtures", "data", "bad_lines.jsonl")
    proc = run_python(
        [
            "-m",
            "lemur_torch.train",
            "~data.sources.stdlib_code",
            "~data.sources.pydoc_text",
            f"++data.sources={{bad: {{kind: jsonl, domain: code, path: {fixture}}}}}",
            "data.lanes=1",
            "data.strict=true",
            "data.num_workers=1",
            "train.seq_len=64",
            "train.global_batch_tokens=128",
            f"run_dir={tmp_path / 'run'}",
            "log.wandb_mode=disabled",
        ],
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad_lines.jsonl:2: malformed JSON" in lines[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_print_the_line_once(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lemur_torch.train",
        "train.grad_clip=0",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert both.count("config error at 'train.grad_clip'") == 1, both[-4000:]
    assert "exitcode  : 2" in both or "exitcode: 2" in both, both[-4000:]  # torchrun's summary names the status
    assert not os.path.exists(run_dir)


def test_hub_tokenizer_that_cannot_be_fetched_names_the_key(monkeypatch):
    """A hub id passes the gate (nothing is downloaded before the process group exists); when it cannot be
    fetched, the error still names data.tokenizer (train.main prints it as one line, exit 2)."""
    import huggingface_hub.constants
    from omegaconf import OmegaConf

    from lemur_torch.errors import ConfigError
    from lemur_torch.tokenizer import build_tokenizer

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so not the variable
    with pytest.raises(ConfigError, match="data.tokenizer") as info:
        build_tokenizer(OmegaConf.create({"tokenizer": "lemur-test/no-such-tokenizer", "format": "pretrain"}))
    assert "\n" not in str(info.value)


def test_good_config_passes_the_gate(monkeypatch, capsys, tmp_path):
    """The defaults and both smoke experiments pass: the gate rejects only what is wrong."""
    seen = []
    monkeypatch.setattr(train, "build_and_fit", lambda cfg: seen.append(cfg) or 0)
    for experiment in ("smoke", "chat_smoke"):
        assert train.main([f"experiment={experiment}", f"run_dir={tmp_path / experiment}"]) == 0
    assert len(seen) == 2 and capsys.readouterr().err == ""
