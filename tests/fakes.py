"""What the tests (and bench/, which puts this folder on sys.path) share, so that no test module imports another:
the one fake loader, batches in the contract, a host stand-in for a backend, the tiny model, and the data tests'
stream helpers and hand-written chat references.

The fake loader follows the Loader protocol of lemur_torch/batch.py, which lists what the trainer and the
checkpointer call; tests/test_batch.py checks it against the protocol, beside the real loaders.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from lemur_torch.attention import with_varlen_boundaries
from lemur_torch.batch import Batch, document_lengths
from lemur_torch.metrics import MetricsLogger
from lemur_torch.model import build_meta_model, init_weights, reset_rope_buffers

# -- the loader and its batches ------------------------------------------------------------------------------


class ListLoader:
    """The Loader protocol over a fixed list of micro-batches, cycled, so that every user sees the same data; its
    position is the number of micro-batches taken."""

    def __init__(self, batches: Sequence[Batch] = (), domain_names: Sequence[str] = ("code", "text")):
        self.batches, self.domain_names, self.pos = list(batches), list(domain_names), 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pos = state["pos"]

    def mark(self) -> int:
        return self.pos

    def rewind(self, mark: int) -> None:
        self.pos = mark

    def stats(self) -> Dict[str, float]:
        return {}


def contract_batch(ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> Batch:
    """A micro-batch in the contract from token ids [B, S]: labels = ids, domain 0, one document per row unless
    `position_ids` say otherwise."""
    B, S = ids.shape
    pos = torch.arange(S).repeat(B, 1) if position_ids is None else position_ids
    return Batch(
        input_ids=ids,
        labels=ids.clone(),
        position_ids=pos,
        domain_ids=torch.zeros_like(ids),
        doc_lens=document_lengths(pos),
    )


def random_batches(batch: int, seq: int, n: int = 8, vocab: int = 32000) -> List[Batch]:
    """`n` fixed micro-batches of random tokens (seeded), for measuring what is not the data pipeline."""
    g = torch.Generator().manual_seed(0)
    return [contract_batch(torch.randint(3, vocab, (batch, seq), generator=g)) for _ in range(n)]


# -- a backend and the model, in one process on the CPU -----------------------------------------------------


class HostBackend:
    """What Validator needs of a backend, in one process on the CPU: simulated data-parallel rank `dp_rank` of
    `dp_size`. all_reduce_sum keeps the local sums in `reduced` (tests add the simulated ranks' up themselves)."""

    device = torch.device("cpu")
    rank = 0

    def __init__(self, dp_rank=0, dp_size=1):
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.reduced = None

    def device_batches(self, batches):
        for batch in batches:  # as the FSDP backend does, on the host: the boundaries for the attention kernel
            yield with_varlen_boundaries(batch)

    def all_reduce_sum(self, t):
        self.reduced = t.clone()
        return t

    def eval_step_done(self):
        pass

    def broadcast_object(self, obj):
        return obj


def tiny_model(cfg):
    """cfg.model on the CPU, initialised as every backend initialises it (init_weights with cfg.train.seed)."""
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, cfg.train.seed, cfg.model.initializer_range)
    return model


# -- the data tests' stream helpers ----------------------------------------------------------------------------


class StepRecorder(MetricsLogger):
    """A logger that keeps every step's metrics in memory (`steps`: step -> metrics) and writes nothing. Enabled,
    as rank 0's is: the trainer gathers a step's line only for a logger that logs."""

    def __init__(self, cfg):
        super().__init__(cfg, enabled=False)
        self.enabled = True
        self.steps: Dict[int, Dict[str, Any]] = {}

    def start_run(self, run_id: str) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def log_step(self, metrics: Dict[str, Any]) -> None:
        self.steps[metrics["step"]] = metrics

    def log_validation(self, metrics: Dict[str, Any]) -> None:
        pass


def list_trainer(cfg, backend, model, logger=None):
    """A Trainer over a ListLoader (no batches: the test hands train_step its micro-batches), the project's
    optimizer and schedule, a checkpointer that logs nowhere and, unless given, a logger that writes nothing."""
    # trainer imports stay local: bench/ and the data tests use this module without building a trainer
    from lemur_torch import trainer as trainer_lib
    from lemur_torch.checkpoint import Checkpointer
    from lemur_torch.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, cfg.optim, backend.device.type)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    return trainer_lib.Trainer(
        cfg,
        backend,
        model,
        optimizer,
        scheduler,
        ListLoader(),
        Checkpointer(cfg, backend, log=lambda m: None),
        logger or MetricsLogger(cfg, enabled=False),
        stop=trainer_lib.StopSignal(),
    )


def rows_of(batch):
    return [
        torch.stack([batch[k][i] for k in ("input_ids", "labels", "position_ids", "domain_ids")])
        for i in range(batch["input_ids"].shape[0])
    ]


def global_stream(per_rank_rows, start=0):
    """Reassemble: rank r's local row j is global row start + r + R*j."""
    R = len(per_rank_rows)
    out = {}
    for r, rows in enumerate(per_rank_rows):
        for j, row in enumerate(rows):
            out[start + r + R * j] = row
    assert sorted(out) == list(range(start, start + len(out)))
    return [out[g] for g in sorted(out)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- chat references ---------------------------------------------------------------------------------------------

# (messages, the training text written out by hand)
CHAT_CASES = [
    (
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}],
        "<s><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n",
    ),
    (
        [
            {"role": "system", "content": "  You are terse.\n"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3 ?  "},
            {"role": "assistant", "content": "\n6\n"},
        ],
        "<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3+3 "
        "?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n",
    ),
    (
        [
            {"role": "user", "content": "Übersetze: «naïve café» — 日本語で? 🙂"},
            {"role": "assistant", "content": "ナイーブなカフェ ☕ (naïve café), ça va?"},
        ],
        "<s><|im_start|>user\nÜbersetze: «naïve café» — 日本語で? 🙂<|im_end|>\n"
        "<|im_start|>assistant\nナイーブなカフェ ☕ (naïve café), ça va?<|im_end|>\n",
    ),
    (
        [
            {"role": "system", "content": "You write code."},
            {"role": "user", "content": "Reverse a list in Python:\n\n    xs = [1, 2, 3]"},
            {
                "role": "assistant",
                "content": "```python\ndef rev(xs):\n\treturn xs[::-1]  # slice\n\n\nprint(rev([1, 2, "
                "3]))\n```\n\nThat prints `[3, 2, 1]`.",
            },
        ],
        "<s><|im_start|>system\nYou write code.<|im_end|>\n<|im_start|>user\nReverse a list in Python:\n\n    xs "
        "= [1, 2, 3]<|im_end|>\n"
        "<|im_start|>assistant\n```python\ndef rev(xs):\n\treturn xs[::-1]  # slice\n\n\nprint(rev([1, 2, 3]))\n```\n\n"
        "That prints `[3, 2, 1]`.<|im_end|>\n",
    ),
    (
        [
            {"role": "user", "content": "Shell?"},
            {"role": "assistant", "content": "$ ls -la | grep '^d'  \n"},
            {"role": "user", "content": '<html> & "quotes" {{ jinja }} {% raw %}'},
            {"role": "assistant", "content": "Escaped: {{ x }}"},
        ],
        "<s><|im_start|>user\nShell?<|im_end|>\n<|im_start|>assistant\n$ ls -la | grep '^d'<|im_end|>\n"
        '<|im_start|>user\n<html> & "quotes" {{ jinja }} {% raw %}<|im_end|>\n<|im_start|>assistant\nEscaped: {{ '
        "x }}<|im_end|>\n",
    ),
]
