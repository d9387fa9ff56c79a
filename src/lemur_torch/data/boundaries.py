"""Document boundaries of a packed micro-batch, computed on the host where the batch is built.

The batch contract carries them as `doc_lens`, an int32 [B, S] tensor: row b's document lengths in order,
zero-padded to S (a row holds at most S documents, and its lengths sum to S). A document continued from the
previous row counts from column 0 of this row, and with `data.attend_across_documents` every row is one
document. The shape is fixed like every other tensor of the batch, so XLA never sees a new shape, and a
row's lengths travel (and shard) with the row.

A kernel that takes the flattened form (flash attention's varlen API: the cumulative lengths of the
micro-batch flattened to one row, and the longest length as a host integer) gets it from `varlen_boundaries`,
called on the host before the batch moves to the device, so no kernel reads boundaries back from the device.
"""

from __future__ import annotations

from typing import Tuple

import torch


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: True where a document starts. Column 0 always starts one; elsewhere a position that does
    not follow the previous one by 1 starts one (the packers restart positions at 0 at each document start)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position_ids -> `doc_lens` [B, S] int32 (see the module docstring)."""
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
