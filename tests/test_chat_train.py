"""Lemur stage 2 end to end on CPU: `lemur-train experiment=chat_smoke` on a handful of conversations, then the HF
export is loaded with transformers and greedy `generate` through the exported tokenizer's chat template must
reproduce a training answer and stop at <|im_end|>."""

import json
import os

import pytest
import torch
from conftest import losses, run_train
from fakes import CHAT_CASES as CASES

pytestmark = pytest.mark.slow  # every test here starts processes

# three formats in one file (auto-detected per record), answers short enough to memorise in a few dozen steps
CONVERSATIONS = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {
        "conversations": [
            {"from": "system", "value": "You write Python."},
            {"from": "human", "value": "Add two numbers."},
            {"from": "gpt", "value": "```python\ndef add(a, b):\n    return a + b\n```"},
        ]
    },
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Now in French."},
            {"role": "assistant", "content": "Salut !"},
        ]
    },
]
# (messages before the answer, the answer), as a user of the exported model would send them
PROMPTS = [
    (
        [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}],
        "```python\ndef add(a, b):\n    return a + b\n```",
    ),
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
]
STEPS = 80


def chat_overrides(data_file, run_dir):
    return [
        "experiment=chat_smoke",
        "~data.sources.pydoc_qa",
        "~data.sources.stdlib_functions",
        f"++data.sources={{mine:{{kind:jsonl,path:{data_file},domain:chat}}}}",
        "data.lanes=1",
        "train.seq_len=128",
        "train.micro_batch_size=2",
        "train.global_batch_tokens=256",
        f"train.max_steps={STEPS}",
        "optim.lr=3e-3",
        "optim.warmup_steps=10",
        "optim.min_lr_ratio=0.3",
        "optim.weight_decay=0.0",
        "checkpoint.every_steps=0",
        "log.wandb_mode=disabled",
        "log.console=false",
        f"run_dir={run_dir}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_e2e")
    data_file = d / "chats.jsonl"
    data_file.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    run_dir = str(d / "run")
    run_train(chat_overrides(data_file, run_dir))
    return run_dir


def test_fine_tune_reproduces_answers_and_stops_at_im_end(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loss = losses(trained)
    assert loss[STEPS] < 0.1 < loss[1], (loss[1], loss[STEPS])
    export = os.path.join(trained, "hf")
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for messages, answer in PROMPTS:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=40)  # eos from the exported generation_config
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        assert new[-1] == im_end, tok.decode(new)
        assert tok.decode(new[:-1]) == answer


def test_export_has_chat_tokenizer_and_padded_vocabulary(trained):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    export = os.path.join(trained, "hf")
    tok = AutoTokenizer.from_pretrained(export)
    assert len(tok) == 32005
    assert tok.convert_tokens_to_ids(["<pad>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|diff_marker|>"]) == list(
        range(32000, 32005)
    )
    assert tok.pad_token == "<pad>"
    assert AutoConfig.from_pretrained(export).vocab_size == 32064
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.get_input_embeddings().weight.shape[0] == 32064
    assert model.get_output_embeddings().weight.shape[0] == 32064
    assert 32002 in GenerationConfig.from_pretrained(export).eos_token_id
    # the exported chat_template renders exactly the training text (expected strings written out in the cases)
    for messages, expected in CASES:
        assert tok.apply_chat_template(messages, tokenize=False) == expected


def test_chat_run_needs_the_padded_vocabulary(tmp_path):
    proc = run_train(
        ["experiment=chat_smoke", "model.vocab_size=32000", "train.max_steps=1", f"run_dir={tmp_path}"], check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.vocab_size" in proc.stderr and "32005" in proc.stderr


def test_two_rank_chat_checkpoint_resumes_on_one_rank(trained, tmp_path):
    """Through lemur-train: 2 gloo ranks stop mid-epoch at step 3, 1 rank resumes from the checkpoint; steps 4-6
    must equal the uninterrupted single-process run (the same conversations in the same order)."""
    data_file = os.path.join(os.path.dirname(trained), "chats.jsonl")
    run_dir = str(tmp_path / "resharded")
    base = chat_overrides(data_file, run_dir)
    run_train([*base, "train.micro_batch_size=1", "train.stop_at_step=3"], nproc=2)
    run_train([*base, "train.stop_at_step=6"])
    ref, got = losses(trained), losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(ref[step] - got[step]) < 1e-4, (step, ref[step], got[step])
