"""The batch contract between the loaders, the trainer and the backends, as types: a micro-batch (`Batch`, and
`DeviceBatch` once a backend has moved it), a loader (`Loader`), the label that carries no loss (`IGNORE_INDEX`)
and the document boundaries of a packed micro-batch.

A micro-batch is a dict of equal-shape [B, S] tensors, B and S fixed on every step (XLA never sees a new shape):
`input_ids`; `labels`, unshifted (the loss shifts them) and `IGNORE_INDEX` where a token carries no loss;
`position_ids`, which restart at 0 where a document starts; `domain_ids`, the index into the loader's
`domain_names` of the source each token came from (the per-domain loss); and `doc_lens`, row b's document lengths
in order, zero-padded to S (a row holds at most S documents and its lengths sum to S). A document continued from
the previous row counts from column 0 of this row, and with `data.attend_across_documents` every row is one
document. `doc_lens` has the shape of every other tensor, so a row's lengths travel (and shard) with the row.

The boundaries are computed on the host where the batch is built (`document_lengths`). A kernel that takes the
flattened form (flash attention's varlen API: the cumulative lengths of the micro-batch flattened to one row and
the longest length as a host integer) gets it from `varlen_boundaries`, called on the host before the batch moves
to the device (`DeviceBatch.cu_seqlens`, `max_seqlen`), so no kernel reads boundaries back from the device. A
kernel on a device that finds documents from `position_ids` itself (torch_xla: fixed shapes, no host sync) uses
`row_document_ids`; the rule is `document_starts`'s, so it finds exactly the documents of `doc_lens`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Protocol, Tuple, TypedDict, runtime_checkable

import torch

# the label of a token that carries no loss (a document's first token, padding, the prompt of a conversation);
# transformers' and torch's cross-entropy use the same value
IGNORE_INDEX = -100


class Batch(TypedDict):
    """A host micro-batch as a loader yields it: [B, S] tensors (see the module docstring)."""

    input_ids: torch.Tensor  # int64
    labels: torch.Tensor  # int64, IGNORE_INDEX: no loss
    position_ids: torch.Tensor  # int64, 0 at each document start
    domain_ids: torch.Tensor  # int64, index into Loader.domain_names
    doc_lens: torch.Tensor  # int32, each row's document lengths, zero-padded


class DeviceBatch(Batch, total=False):
    """A micro-batch on the device (Backend.device_batches). The FSDP backend adds the varlen form of the
    boundaries, made on the host; the XLA backend adds nothing (its kernels use `row_document_ids`)."""

    cu_seqlens: torch.Tensor  # int32 [D + 1], the micro-batch flattened to one row
    max_seqlen: int  # the longest document, a host integer


@runtime_checkable
class Loader(Protocol):
    """What the trainer and the checkpointer use of a loader (data.build_loader's; tests/fakes.py has a fake).

    Build and iterate it on every data-parallel rank in lockstep: building the real one creates a gloo group."""

    domain_names: List[str]  # index i = domain id i

    def __iter__(self) -> Iterator[Batch]:
        """This rank's micro-batches, endlessly."""

    def state_dict(self) -> Dict[str, Any]:
        """A small picklable dict, identical on every rank and independent of the world size, taken after a whole
        optimizer step. A collective: every data-parallel rank calls it at the same point (the checkpointer does,
        at every save); iterating communicates nothing."""

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the global stream exactly where `state` was taken, on any number of ranks."""

    def mark(self) -> Any:
        """The current position, cheaply (the trainer takes one before each step's micro-batches)."""

    def rewind(self, mark: Any) -> None:
        """Back to a `mark()`: after a failed read mid-step the trainer checkpoints the last completed step."""

    def stats(self) -> Dict[str, float]:
        """Figures to log with the step (token ratio per domain, skipped documents, bytes read ...); no
        communication (called on log steps, where the step is logged)."""


def _breaks(position_ids: torch.Tensor, before_first: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: True where a position does not follow the one before it by 1 (HF's rule for packed rows; the
    packers restart positions at 0 at each document start), column 0 compared with `before_first`. Fixed shapes
    and no host sync, so it runs on any device."""
    return torch.diff(position_ids, dim=-1, prepend=before_first) != 1


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: True where a document starts: column 0, and wherever the position breaks."""
    return _breaks(position_ids, position_ids[:, :1])


def row_document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] index of each token's document within its row (0 for the row's first), from position_ids on any
    device: two tokens of a row may attend to each other only where these are equal. Column 0 is not counted as
    a break, so the ids start at 0 without a subtraction (torch_xla refuses arithmetic on a bool cumsum)."""
    return _breaks(position_ids, position_ids[:, :1] - 1).cumsum(-1)


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """Host [B, S] position_ids -> `doc_lens` [B, S] int32 (see the module docstring)."""
    B, S = position_ids.shape
    rows, cols = document_starts(position_ids).nonzero(as_tuple=True)  # row-major order
    flat = rows * S + cols
    # every row starts a document at column 0, so the next start (or the end of the batch) ends each one
    ends = torch.cat([flat[1:], flat.new_tensor([B * S])])
    per_row = torch.bincount(rows, minlength=B)
    first = torch.cumsum(per_row, 0) - per_row  # index of each row's first document
    out = torch.zeros(B, S, dtype=torch.int32)
    out[rows, torch.arange(len(rows)) - first[rows]] = (ends - flat).to(torch.int32)
    return out


def varlen_boundaries(doc_lens: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Host `doc_lens` [B, S] -> (cu_seqlens int32 [D + 1] of the micro-batch flattened to one row, the longest
    document length as a Python int), the form of flash attention's varlen API."""
    lens = doc_lens.reshape(-1)
    lens = lens[lens > 0]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=cu[1:])
    return cu, int(lens.max())


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[B, S] index of each token's document in the flattened micro-batch, from cu_seqlens (on any device, no
    host sync, fixed output shape). Two tokens may attend to each other only where these are equal."""
    total = batch * seq_len
    starts = torch.zeros(total + 1, dtype=torch.int32, device=cu_seqlens.device)
    starts.index_fill_(0, cu_seqlens.long(), 1)
    return (torch.cumsum(starts[:total], 0) - 1).view(batch, seq_len)
