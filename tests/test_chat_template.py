"""ChatML rendering, token ids and label masks of data/chat.py against references written out or computed here.

The expected texts are typed out by hand from the Lemur-Chat template; the expected label mask
comes from the tokenizer's own character offsets on the whole text, marking the characters of each assistant
answer plus its "<|im_end|>\\n" -- nothing from chat.py is used to build a reference.
"""

import pytest
from fakes import CHAT_CASES as CASES
from omegaconf import OmegaConf

from lemur_torch.data.chat import ChatEncoder, Conversation, render, to_conversation
from lemur_torch.data.sources import Bad
from lemur_torch.tokenizer import build_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(OmegaConf.create({"tokenizer": "builtin", "format": "chat"}))


def assistant_char_spans(messages):
    """[start, end) of each assistant answer + "<|im_end|>\\n" in the training text, walking it by hand."""
    pos, spans = len("<s>"), []
    for m in messages:
        pos += len("<|im_start|>" + m["role"] + "\n")
        end = pos + len(m["content"].strip()) + len("<|im_end|>\n")
        if m["role"] == "assistant":
            spans.append((pos, end))
        pos = end
    return spans


def offset_mask(tok, text, spans):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def test_new_token_ids_and_template(tok):
    assert len(load_tokenizer("builtin")) == 32000  # the pretraining tokenizer is left as it is
    assert len(tok) == 32005
    assert tok.convert_tokens_to_ids(["<pad>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|diff_marker|>"]) == [
        32000,
        32001,
        32002,
        32003,
        32004,
    ]
    assert tok.pad_token_id == 32000
    assert tok.convert_tokens_to_ids("<s>") == 1 and tok.convert_tokens_to_ids("</s>") == 2


@pytest.mark.parametrize("case", range(len(CASES)))
def test_rendering_is_byte_exact(tok, case):
    messages, expected = CASES[case]
    conv = to_conversation({"messages": messages})
    assert render(conv.messages).encode() == expected.encode()
    assert tok.apply_chat_template(messages, tokenize=False).encode() == expected.encode()
    gen = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert expected.startswith(gen) and gen.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_turn_by_turn_ids_and_labels_match_offsets(tok, case):
    messages, expected = CASES[case]
    ids, labels, _ = ChatEncoder(tok, 4096).encode([to_conversation({"messages": messages})])[0]
    ref_ids, ref_mask = offset_mask(tok, expected, assistant_char_spans(messages))
    assert ids == ref_ids  # turn by turn == the tokenizer's encoding of the whole text
    assert [label != -100 for label in labels] == ref_mask
    assert [x for x, label in zip(ids, labels) if label != -100] == [x for x, m in zip(ref_ids, ref_mask) if m]
    # the trainable text is exactly the answers and their end markers
    answers = "".join(m["content"].strip() + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
    assert tok.decode([x for x, label in zip(ids, labels) if label != -100]) == answers


def test_builtin_conversations_match_whole_text_encoding(tok):
    """Real material (the built-in sets: reST, code, unicode) through both paths: turn by turn == whole text."""
    from lemur_torch.data.chat_sources import pydoc_conversations, stdlib_function_conversations

    items = list(pydoc_conversations()[::8]) + list(stdlib_function_conversations()[::25])
    convs = [Conversation(list(turns)) for _, turns in items]
    enc = ChatEncoder(tok, 1 << 20)
    for conv, (ids, labels, _) in zip(convs, enc.encode(convs)):
        messages = conv.as_dicts()
        text = tok.apply_chat_template(messages, tokenize=False)
        ref_ids, ref_mask = offset_mask(tok, text, assistant_char_spans(messages))
        assert ids == ref_ids
        assert [label != -100 for label in labels] == ref_mask


def test_formats_give_the_same_conversation():
    want = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]
    openai = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ]
    }
    sharegpt_top_system = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
    }
    alpaca = {"instruction": "Hi", "input": "", "output": "Hello!", "system": "Be brief."}
    orca = {"system_prompt": "Be brief.", "question": "Hi", "response": "Hello!"}
    for obj, fmt in ((openai, "auto"), (sharegpt, "auto"), (sharegpt_top_system, "sharegpt"), (alpaca, "auto")):
        assert to_conversation(obj, fmt).messages == want, obj
    fields = {"system": "system_prompt", "instruction": "question", "output": "response"}
    assert to_conversation(orca, "alpaca", fields).messages == want
    with_input = to_conversation({"instruction": "Sum these.", "input": "1 2", "output": "3"})
    assert with_input.messages == [("user", "Sum these.\n\n1 2"), ("assistant", "3")]


@pytest.mark.parametrize(
    "obj,reason",
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "tool", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "unknown_role",
        ),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "bing", "value": "b"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  \n"}]}, "empty_turn"),
        ({"messages": []}, "empty_turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            "not_ending_with_assistant",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            "bad_order",
        ),
        ({"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "c"}]}, "wrong_type"),
        ({"messages": "hello"}, "wrong_type"),
        ({"instruction": "a", "output": 3}, "wrong_type"),
        ({"instruction": "a"}, "missing_field"),
        ({"text": "plain"}, "missing_field"),
    ],
)
def test_bad_conversations(obj, reason):
    bad = to_conversation(obj)
    assert isinstance(bad, Bad) and bad.reason == reason, bad


def test_truncation_at_turn_boundary(tok):
    conv = to_conversation(
        {
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "second answer " * 30},
            ]
        }
    )
    full = ChatEncoder(tok, 4096)
    ids, labels, ends = full.encode([conv])[0]
    first_end = ends[1]  # tokens up to the end of the first assistant message
    row = ChatEncoder(tok, first_end + 5).documents([conv])[0]
    assert row.shape == (2, first_end)  # cut after the first answer, not in the middle of the second
    assert row[0].tolist() == ids[:first_end] and row[1].tolist() == labels[:first_end]
    # the first answer alone is too long: cut mid-answer at seq_len, the kept part of it still trains
    long = to_conversation(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 100}]}
    )
    cut = ChatEncoder(tok, 20).documents([long])[0]
    assert cut.shape == (2, 20) and (cut[1] != -100).any()
    # the prompt alone fills seq_len: nothing to learn, dropped with its reason
    prompt = to_conversation(
        {"messages": [{"role": "user", "content": "q " * 50}, {"role": "assistant", "content": "a"}]}
    )
    prompt_conv = Conversation(prompt.messages, loc="f.jsonl:3")
    dropped = ChatEncoder(tok, 16).documents([prompt_conv])[0]
    assert isinstance(dropped, Bad) and dropped.reason == "no_trainable_tokens" and dropped.loc == "f.jsonl:3"


def test_lemur_70b_chat_experiment_is_the_papers_stage_2():
    from lemur_torch.config import load_config, validate

    cfg = load_config(["experiment=lemur_70b_chat"])
    validate(cfg, 64)
    assert cfg.data.format == "chat" and cfg.model.name == "llama2_70b" and cfg.model.vocab_size == 32064
    assert cfg.model.pretrained == "OpenLemur/lemur-70b-v1"
    assert cfg.train.seq_len == 4096 and cfg.train.global_batch_tokens // cfg.train.seq_len == 128
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.0
    assert sorted(cfg.data.sources) == ["evol_codealpaca", "oasst1", "openorca", "sharegpt"]
    assert all(s.kind == "hf" for s in cfg.data.sources.values())
