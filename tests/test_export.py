"""HF interop both ways, checked against transformers' own loader."""

import json
import os

import pytest
import torch
from conftest import FAST, run_python, run_train
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lemur_torch.config import load_config
from lemur_torch.model import hf_llama_config
from lemur_torch.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # every test here starts processes

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_logits.py")


def torchrun(args, nproc=2):
    proc = run_python([SCRIPT, *args], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-5000:]


def fixed_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 32000, (2, 40), generator=g)


def test_hf_checkpoint_loads_into_two_rank_fsdp(tmp_path):
    cfg = load_config(["model=tiny"])
    torch.manual_seed(3)
    ref = LlamaForCausalLM(hf_llama_config(cfg.model)).eval()
    ref.save_pretrained(tmp_path / "hf", max_shard_size="3MB")  # several shards + index, like a 70B folder
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    torchrun(["--pretrained", str(tmp_path / "hf"), "--out-logits", str(tmp_path / "logits.pt")])
    with torch.no_grad():
        expected = ref(input_ids=fixed_batch(), use_cache=False).logits
    got = torch.load(tmp_path / "logits.pt")
    assert (got - expected).abs().max() < 1e-5


def test_export_of_trained_model_loads_in_transformers(tmp_path):
    run_dir = str(tmp_path / "run")
    run_train(
        [
            *FAST,
            "train.max_steps=4",
            f"run_dir={run_dir}",
            "checkpoint.export_at_end=true",
            "checkpoint.max_shard_size_mb=4",
        ],
        nproc=2,
    )
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000004")
    # the trained FSDP model (2 ranks, from its checkpoint) and its own export via lemur-export's path
    torchrun(
        ["--checkpoint", ckpt, "--out-logits", str(tmp_path / "trained.pt"), "--export", str(tmp_path / "export2")]
    )
    trained = torch.load(tmp_path / "trained.pt")
    for folder in (os.path.join(run_dir, "hf"), str(tmp_path / "export2")):
        files = sorted(os.listdir(folder))
        assert "config.json" in files and "model.safetensors.index.json" in files
        shards = [f for f in files if f.endswith(".safetensors")]
        assert len(shards) > 1 and all(f.startswith("model-0000") for f in shards), files
        assert not os.path.exists(os.path.join(folder, "sharded"))
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(input_ids=fixed_batch()).logits
        assert (logits - trained).abs().max() < 1e-5, folder
    tok = AutoTokenizer.from_pretrained(os.path.join(run_dir, "hf"))
    assert len(tok) == 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    # a consumer of the export encodes text as training documents start: BOS, then the text's own pieces
    text = "def add(a, b):\n    return a + b"
    assert tok(text).input_ids == [1] + load_tokenizer()(text, add_special_tokens=False).input_ids


def test_lemur_export_cli(tmp_path):
    run_dir = str(tmp_path / "run")
    run_train([*FAST, "train.max_steps=2", f"run_dir={run_dir}"])
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
    out = tmp_path / "cli_export"
    proc = run_python(["-m", "lemur_torch.export", ckpt, str(out), "--dtype", "bfloat16"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    with open(out / "model.safetensors.index.json") as f:
        assert len(json.load(f)["weight_map"]) == sum(1 for _ in model.state_dict())
    bad = run_python(["-m", "lemur_torch.export", str(tmp_path), str(out)])
    assert bad.returncode == 2 and "not a complete lemur-torch checkpoint" in bad.stderr
    # an output folder that is not an earlier export is never replaced (the run and checkpoint folders:
    # tests/test_checkpoint.py)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    refused = run_python(["-m", "lemur_torch.export", ckpt, str(precious)])
    assert refused.returncode == 2 and "refusing" in refused.stderr, refused.stderr[-2000:]
    assert (precious / "notes.txt").read_text() == "keep me"


def test_bf16_checkpoint_with_smaller_vocab_loads_with_mean_rows(tmp_path):
    """A Llama-2-style 32000-row bf16 checkpoint into a 32064-row model (the chat stage's padded vocabulary)."""
    cfg = load_config(["model=tiny"])
    torch.manual_seed(5)
    ref = LlamaForCausalLM(hf_llama_config(cfg.model)).to(torch.bfloat16).eval()
    ref.save_pretrained(tmp_path / "hf")
    torchrun(
        ["--pretrained", str(tmp_path / "hf"), "--out-logits", str(tmp_path / "logits.pt"), "model.vocab_size=32064"]
    )
    got = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = ref.float()(input_ids=fixed_batch(), use_cache=False).logits
        head = ref.lm_head.weight.float()
        hidden = ref.float().model(input_ids=fixed_batch()).last_hidden_state
    assert got.shape[-1] == 32064
    assert (got[..., :32000] - expected).abs().max() < 1e-4
    # new rows = mean of the old lm_head rows: their logits are the mean of the old logits' projection
    assert (got[..., 32000:] - (hidden @ head.mean(0)).unsqueeze(-1)).abs().max() < 1e-4
