"""Data pipeline: sources -> mixture -> packing -> loader. The trainer sees only `build_loader`.

A loader is an iterable of micro-batches that follow the batch contract (shared/DESIGN.md): a dict of
equal-shape [B, S] tensors `input_ids`, `labels` (-100 = no loss), `position_ids`, `domain_ids` and `doc_lens`
(each row's document lengths, zero-padded: the attention kernels' boundaries, data/boundaries.py), with B and S
fixed on every step. It also has:
  - `domain_names`: list[str], index i = domain id i (for the per-domain loss);
  - `state_dict()` -> a small picklable dict, identical on every rank and independent of the world size,
    taken after a whole optimizer step; it needs no communication (ranks exchange positions as they go);
Build and iterate the loader on every data-parallel rank in lockstep: building it creates a gloo group.
  - `load_state_dict(state)`: continue the *global* stream exactly there, on any number of ranks;
  - `stats()` -> dict of floats to log (e.g. realised token ratio per domain, skipped documents).
"""

from lemur_torch.data.loader import build_loader  # noqa: F401
