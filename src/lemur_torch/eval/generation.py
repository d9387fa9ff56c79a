"""Batched generation with transformers for benchmarks.

Requests (prompt x sample) are sorted by length (longest first: an out-of-memory shows up in the first batch),
left-padded into batches and given to `model.generate`. Stop strings are checked per sequence on the
generated text only: a row that reached one stops (generate pads it from then on) while the others go on, and
the whole batch ends when every row has. Each completion is decoded as decode(prompt + new) minus
decode(prompt): SentencePiece drops the leading space of a sequence that starts mid-text, which would eat a
level of indentation if the new tokens were decoded alone. Prompts start with BOS, as every training
document does (the built-in tokenizer does not add it by itself).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass
class Generation:
    text: str  # the completion, cut before the first stop string
    tokens: int  # tokens the model generated for it (up to and including what ended it)
    finish: str  # "stop" (a stop string), "eos" or "length"


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0
    batches: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest stop string (the Codex truncation)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def encode_prompt(tokenizer, text: str) -> List[int]:
    """Token ids starting with exactly one BOS (a chat template may already write it into the text)."""
    in_text = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=not in_text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def eos_ids(model, tokenizer) -> List[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted(set([eos] if isinstance(eos, int) else list(eos)))


class StopPerSequence(StoppingCriteria):
    """Marks each row done at its first stop string in the generated text or its first EOS, and remembers at
    which length: generate() keeps unfinished rows going and pads the finished ones."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int, eos: Sequence[int], rows: int):
        self.tokenizer, self.stops, self.prompt_len, self.eos = tokenizer, [s for s in stops if s], prompt_len, set(eos)
        # a stop string of c characters spans at most c tokens (+1 for a byte-level split)
        self.window = max((len(s) for s in self.stops), default=0) + 2
        self.ended_at: List[Optional[int]] = [None] * rows
        self.reason: List[str] = ["length"] * rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1]
        last = input_ids[:, -1].tolist()
        open_rows = [i for i, e in enumerate(self.ended_at) if e is None]
        for i in open_rows:
            if last[i] in self.eos:
                self.ended_at[i], self.reason[i] = length, "eos"
        open_rows = [i for i in open_rows if self.ended_at[i] is None]
        if self.stops and open_rows:
            start = max(self.prompt_len, length - self.window)
            tails = self.tokenizer.batch_decode(input_ids[open_rows, start:].tolist())
            for i, tail in zip(open_rows, tails):
                if any(s in tail for s in self.stops):
                    self.ended_at[i], self.reason[i] = length, "stop"
        return torch.tensor([e is not None for e in self.ended_at], device=input_ids.device)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    seed: int = 0,
    stats: Optional[GenerationStats] = None,
    progress=None,
) -> List[List[Generation]]:
    """n_samples completions of each prompt; result[i][j] is sample j of prompt i."""
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    requests = sorted(
        ((i, j) for i in range(len(prompts)) for j in range(n_samples)), key=lambda r: (-len(encoded[r[0]]), r)
    )
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    torch.manual_seed(seed)
    out: List[List[Optional[Generation]]] = [[None] * n_samples for _ in prompts]
    stats = stats if stats is not None else GenerationStats()
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        ids = [encoded[i] for i, _ in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x) :] = torch.tensor(x)
            attention_mask[r, width - len(x) :] = 1
        criteria = StopPerSequence(tokenizer, stop, width, eos, len(batch))
        t0 = time.perf_counter()
        result = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            stopping_criteria=StoppingCriteriaList([criteria]),
            eos_token_id=eos,
            pad_token_id=pad,
            use_cache=True,
            **sampling,
        )  # whatever the config says
        stats.seconds += time.perf_counter() - t0
        stats.batches += 1
        new = result[:, width:].tolist()
        for r, (i, j) in enumerate(batch):
            end = criteria.ended_at[r]
            n_new = (end - width) if end is not None else len(new[r])
            text = _decode_continuation(tokenizer, ids[r], new[r][:n_new])
            out[i][j] = Generation(text=cut_at_stop(text, stop), tokens=n_new, finish=criteria.reason[r])
            stats.tokens += n_new
        if progress is not None:
            progress(len(batch))
    return out  # type: ignore[return-value]


def _decode_continuation(tokenizer, prompt_ids: List[int], new_ids: List[int]) -> str:
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(prefix):
        return full[len(prefix) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)
