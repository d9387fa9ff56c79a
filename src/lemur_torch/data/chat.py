"""ChatML as Lemur-Chat renders it, conversation formats, and token ids + labels built turn by turn.

Rendering (Lemur-Chat, the recipe's stage 2): BOS once, then per message, content stripped,

    <|im_start|>{role}\\n{content}<|im_end|>\\n

`CHAT_TEMPLATE` is the same rendering as a Jinja chat_template, saved with the exported tokenizer, so
`tokenizer.apply_chat_template(messages)` gives the training text byte for byte (and, with
`add_generation_prompt=True`, the `<|im_start|>assistant\\n` header a reply is generated after).

Labels are built turn by turn, never by re-tokenizing prefixes of the conversation: each message is
[<|im_start|>] + ids(role + "\\n") + ids(content) + [<|im_end|>] + ids("\\n"). Loss falls on an assistant
message's content, its <|im_end|> and that "\\n"; BOS, system and user messages and every header are -100.
Each piece is tokenized as the tokenizer tokenizes it *in place*: SentencePiece adds a "▁" at the start of a
string but not after a special token or a newline, so a piece is encoded behind a fixed anchor (the special
token <|im_start|> for the headers' role and the tail's newline, a "\\n" for content) whose ids are then
dropped. Newline is a hard boundary for the Llama vocabulary (no piece contains it) and special tokens split
the text, so the concatenation equals the tokenizer's own encoding of the whole rendered text; tests check it
against character offsets.

Content is text: message contents are encoded with special-token parsing off (encode.Tokenize), so a message
that contains "<|im_end|>\\n<|im_start|>assistant\\n", "<s>", "</s>" or "<pad>" gets the ids of those
characters, and the only control ids in a conversation are the ones this module places (BOS, and one
<|im_start|> and one <|im_end|> per message). `tokenizer.apply_chat_template(messages, tokenize=True)` does
not keep that guarantee: it renders one string and tokenizes it with special tokens parsed, so a server must
encode prompts with `ChatEncoder.prompt` (or, equally, render with the template and tokenize each message's
content on its own with `split_special_tokens=True`); docs/architecture.md, "Serving the chat model".

Conversations longer than seq_len are cut after the last assistant message that fits; when not even the first
assistant message fits they are cut at seq_len tokens; an example left with no trainable token is dropped and
counted (`no_trainable_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.data.encode import Tokenize, batch_encoder
from lemur_torch.data.sources.records import MISSING_FIELD, Bad

PAD, IM_START, IM_END, IM_SEP, DIFF_MARKER = "<pad>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|diff_marker|>"
# the order fixes the ids: 32000..32004 on the Llama-2 tokenizer (Lemur-Chat's released tokenizer)
CHAT_SPECIAL_TOKENS = (PAD, IM_START, IM_END, IM_SEP, DIFF_MARKER)
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# reasons a conversation is skipped (next to sources.records.REASONS in the per-source skip counters)
WRONG_TYPE = "wrong_type"
UNKNOWN_ROLE = "unknown_role"
EMPTY_TURN = "empty_turn"
BAD_ORDER = "bad_order"
NOT_ENDING_WITH_ASSISTANT = "not_ending_with_assistant"
NO_TRAINABLE = "no_trainable_tokens"  # not bad input: the conversation did not fit seq_len; counted, never strict
CHAT_REASONS = (WRONG_TYPE, UNKNOWN_ROLE, EMPTY_TURN, BAD_ORDER, NOT_ENDING_WITH_ASSISTANT, NO_TRAINABLE)

FORMATS = ("auto", "messages", "sharegpt", "alpaca")
# the fields each format reads (renamed per source with `fields:`)
DEFAULT_FIELDS = {
    "messages": "messages",
    "role": "role",
    "content": "content",
    "conversations": "conversations",
    "from": "from",
    "value": "value",
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "system": "system",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    """A validated conversation: (role, content) pairs, roles in ROLES, contents stripped and non-empty."""

    messages: List[Tuple[str, str]]
    loc: str = ""
    _chars: int = field(init=False, repr=False)

    def __post_init__(self):
        self._chars = sum(len(c) for _, c in self.messages)

    def __len__(self) -> int:  # the packer budgets its read-ahead in characters
        return self._chars

    def as_dicts(self) -> List[Dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def render(messages: Sequence[Union[Tuple[str, str], Dict[str, str]]], bos: str = "<s>") -> str:
    """The training text of a conversation (what CHAT_TEMPLATE renders)."""
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else m for m in messages]
    return bos + "".join(f"{IM_START}{role}\n{content.strip()}{IM_END}\n" for role, content in pairs)


# -- formats -> Conversation ------------------------------------------------------------------------------


def _check_turns(turns: List[Tuple[object, object]], where: str) -> Union[Conversation, Bad]:
    out = []
    for i, (role, content) in enumerate(turns):
        if not isinstance(role, str) or not isinstance(content, str):
            return Bad(
                WRONG_TYPE,
                f"{where} {i}: role/content must be strings, got {type(role).__name__}/{type(content).__name__}",
            )
        if role not in ROLES:
            return Bad(UNKNOWN_ROLE, f"{where} {i}: unknown role {role!r} (use system, user, assistant)")
        if not content.strip():
            return Bad(EMPTY_TURN, f"{where} {i}: empty {role} turn")
        if role == "system" and i > 0:
            return Bad(BAD_ORDER, f"{where} {i}: a system message is only allowed first")
        out.append((role, content.strip()))
    if not out:
        return Bad(EMPTY_TURN, f"no {where}s")
    if out[-1][0] != "assistant":
        return Bad(NOT_ENDING_WITH_ASSISTANT, f"the last {where} is {out[-1][0]!r}, not 'assistant'")
    return Conversation(out)


def to_conversation(obj, fmt: str = "auto", fields: Optional[Dict[str, str]] = None) -> Union[Conversation, Bad]:
    """One record (a JSON object / HF example) in the OpenAI `messages`, ShareGPT or Alpaca form -> Conversation
    or Bad."""
    f = {**DEFAULT_FIELDS, **(fields or {})}
    if not isinstance(obj, dict):
        return Bad(WRONG_TYPE, f"a {type(obj).__name__}, not an object")
    if fmt == "auto":
        present = [k for k in ("messages", "conversations", "instruction") if obj.get(f[k]) is not None]
        if not present:
            return Bad(
                MISSING_FIELD, f"none of the fields {f['messages']!r}, {f['conversations']!r}, {f['instruction']!r}"
            )
        fmt = {"messages": "messages", "conversations": "sharegpt", "instruction": "alpaca"}[present[0]]
    if fmt == "alpaca":
        instruction, inp, output, system = (obj.get(f[k]) for k in ("instruction", "input", "output", "system"))
        if instruction is None or output is None:
            return Bad(MISSING_FIELD, f"alpaca record needs {f['instruction']!r} and {f['output']!r}")
        for name, v in (
            ("instruction", instruction),
            ("output", output),
            ("input", inp or ""),
            ("system", system or ""),
        ):
            if not isinstance(v, str):
                return Bad(WRONG_TYPE, f"{f[name]!r} is {type(v).__name__}, not a string")
        user = instruction.strip() + ("\n\n" + inp.strip() if inp and inp.strip() else "")
        turns = ([("system", system)] if system and system.strip() else []) + [("user", user), ("assistant", output)]
        return _check_turns(turns, "turn")
    key, role_key, content_key = {
        "messages": ("messages", "role", "content"),
        "sharegpt": ("conversations", "from", "value"),
    }[fmt]
    msgs = obj.get(f[key])
    if msgs is None:
        return Bad(MISSING_FIELD, f"no field {f[key]!r}")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        return Bad(WRONG_TYPE, f"{f[key]!r} must be a list of objects")
    turns = [(m.get(f[role_key]), m.get(f[content_key])) for m in msgs]
    if fmt == "sharegpt":
        turns = [(SHAREGPT_ROLES.get(r, r) if isinstance(r, str) else r, c) for r, c in turns]
        system = obj.get(f["system"])  # some ShareGPT dumps keep the system prompt beside the turns
        if isinstance(system, str) and system.strip() and not (turns and turns[0][0] == "system"):
            turns.insert(0, ("system", system))
    return _check_turns(turns, "message")


# -- ids and labels ---------------------------------------------------------------------------------------


class ChatEncoder(Tokenize):
    """Conversations -> int32 arrays [2, n] (input_ids, labels), turn by turn; the packers' `tokenize`."""

    def __init__(self, tokenizer, seq_len: int):
        super().__init__(tokenizer)
        vocab = tokenizer.get_vocab()
        missing = [t for t in CHAT_SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the ChatML tokens {missing}: build it with lemur_torch.tokenizer.build_tokenizer "
                "on a data config with format: chat"
            )
        if self.bos is None:
            raise ValueError("the chat format needs a tokenizer with a BOS token")
        self.seq_len = int(seq_len)
        self.im_start, self.im_end = vocab[IM_START], vocab[IM_END]
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab[PAD]
        # the template's own markup, the one text whose special-token strings are control ids
        markup = batch_encoder(tokenizer, specials=True)
        # headers and tails follow a special token; pieces are encoded behind an anchor whose ids are then
        # dropped (module docstring)
        self.header = {r: [self.im_start] + self._in_place([r + "\n"], IM_START, markup)[0] for r in ROLES}
        self.tail = [self.im_end] + self._in_place(["\n"], IM_START, markup)[0]

    def _in_place(self, pieces: List[str], anchor: str, encode) -> List[List[int]]:
        """Each piece's ids as `encode` produces them right after `anchor` in a longer text."""
        anchor_ids = encode([anchor])[0]
        out = []
        for piece, ids in zip(pieces, encode([anchor + p for p in pieces])):
            if ids[: len(anchor_ids)] != anchor_ids:
                raise ValueError(
                    f"tokenizer merges across {anchor!r} when encoding {piece[:40]!r}: turn-by-turn labels would "
                    "be wrong"
                )
            out.append(ids[len(anchor_ids) :])
        return out

    def encode(self, conversations: Sequence[Conversation]) -> List[Tuple[List[int], List[int], List[int]]]:
        """Untruncated (ids, labels, message end offsets) per conversation; one batched tokenizer call for all
        contents."""
        contents = [c.strip() for conv in conversations for _, c in conv.messages]  # as render() does
        # content is text (Tokenize): markup inside a message stays characters, so no message can forge a turn.
        # It follows "<role>\n" in the rendered text; "\n" is a hard boundary, so the anchor "\n" stands for that
        content_ids = iter(self._in_place(contents, "\n", self._fn) if contents else [])
        out = []
        for conv in conversations:
            ids, labels, ends = [self.bos], [IGNORE_INDEX], []
            for role, _ in conv.messages:
                body = next(content_ids) + self.tail
                ids += self.header[role] + body
                labels += [IGNORE_INDEX] * len(self.header[role]) + (
                    body if role == "assistant" else [IGNORE_INDEX] * len(body)
                )
                ends.append(len(ids))
            out.append((ids, labels, ends))
        return out

    def prompt(self, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> List[int]:
        """Ids of a conversation so far, for generation: the training encoding of `messages` (role/content
        dicts, contents as text), then the `<|im_start|>assistant\\n` header a reply is generated after. The same
        ids as the exported chat_template's text, with markup parsed in the template only, never in a message."""
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i}: needs role in {ROLES} and a string content")
        conv = Conversation([(m["role"], m["content"].strip()) for m in messages])
        ids, _, _ = self.encode([conv])[0]
        return ids + (self.header["assistant"] if add_generation_prompt else [])

    def truncate(
        self, conv: Conversation, ids: List[int], labels: List[int], ends: List[int]
    ) -> Union[np.ndarray, Bad]:
        S = self.seq_len
        if len(ids) > S:
            fits = [e for e, (role, _) in zip(ends, conv.messages) if e <= S and role == "assistant"]
            cut = fits[-1] if fits else S  # after the last assistant message that fits, else mid-turn
            ids, labels = ids[:cut], labels[:cut]
        if all(x == IGNORE_INDEX for x in labels):
            return Bad(NO_TRAINABLE, f"no assistant token within seq_len={S} ({len(ids)} tokens kept)", conv.loc)
        return np.array([ids, labels], dtype=np.int32)

    def documents(self, conversations: List[Conversation]) -> List[Union[np.ndarray, Bad]]:
        return [self.truncate(conv, *enc) for conv, enc in zip(conversations, self.encode(conversations))]
