"""Data pipeline: sources -> mixture -> packing -> loader. The trainer sees only `build_loader`.

A loader follows the batch contract of lemur_torch/batch.py: it yields `Batch` micro-batches and offers what
`Loader` lists (domain names, state_dict/load_state_dict, mark/rewind, stats). Build and iterate it on every
data-parallel rank in lockstep: building it creates a gloo group.

The modules: schema.py (the `data:` config, typed), check.py (the config checked before a run), sources/
(readers), chat.py and chat_sources.py (conversations), mixture.py (which source each row comes from),
encode.py (text to ids), packing.py (ids to rows), stream.py (a rank's rows), loader.py and chat_loader.py
(micro-batches, state: lane positions gathered at saves), resume.py (the state's identity), heldout.py
(validation rows of a held-out slice), storage.py and parquet_pages.py (bytes), build.py (`build_loader`).
"""

__all__ = ["build_loader"]


def __getattr__(name: str):
    if name == "build_loader":
        # the loader imports torch and the tokenizers; the data config's schema (lemur_torch.data.schema, imported by
        # lemur_torch.config) does not, so lemur-plan composes a config without importing torch
        from lemur_torch.data.build import build_loader

        return build_loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
