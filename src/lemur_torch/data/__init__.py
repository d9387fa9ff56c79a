"""Data pipeline: sources -> mixture -> packing -> loader. The trainer sees only `build_loader`.

A loader follows the batch contract of lemur_torch/batch.py: it yields `Batch` micro-batches and offers what
`Loader` lists (domain names, state_dict/load_state_dict, mark/rewind, stats). Build and iterate it on every
data-parallel rank in lockstep: building it creates a gloo group.
"""

from lemur_torch.data.loader import build_loader  # noqa: F401
