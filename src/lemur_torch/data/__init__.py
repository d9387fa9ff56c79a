"""Data pipeline: sources -> mixture -> packing -> loader. The trainer sees only `build_loader`.

A loader is an iterable of micro-batches that follow the batch contract: a dict of equal-shape [B, S] tensors
`input_ids`, `labels` (-100 = no loss), `position_ids`, `domain_ids` and `doc_lens` (each row's document
lengths, zero-padded: the attention kernels' boundaries, data/boundaries.py), with B and S fixed on every step.
It also has:
  - `domain_names`: list[str], index i = domain id i (for the per-domain loss);
  - `state_dict()` -> a small picklable dict, identical on every rank and independent of the world size,
    taken after a whole optimizer step; it needs no communication (ranks exchange positions as they go);
  - `load_state_dict(state)`: continue the *global* stream exactly there, on any number of ranks;
  - `mark()` / `rewind(mark)`: back to the last completed step after a failed read mid-step;
  - `stats()` -> dict of floats to log (e.g. realised token ratio per domain, skipped documents).
Build and iterate the loader on every data-parallel rank in lockstep: building it creates a gloo group.

The modules: schema.py (the `data:` config, typed), check.py (the config checked before a run), sources/
(readers), chat.py and chat_sources.py (conversations), mixture.py (which source each row comes from),
encode.py (text to ids), packing.py (ids to rows), stream.py (a rank's rows), loader.py and chat_loader.py
(micro-batches, the lane exchange, state), resume.py (the state's identity), heldout.py (validation rows of a
held-out slice), storage.py and parquet_pages.py (bytes), build.py (`build_loader`).
"""

from lemur_torch.data.build import build_loader

__all__ = ["build_loader"]
