"""The gate: every input a run reads before its first step, checked before the process group or any model.

`lemur-train` composes the config (config.load_config), checks its values (config.validate), then calls
`check_inputs`, which looks at what the config names, on this machine, without the network and without
reading a corpus:
- the data sources: kind, domain, fields, local paths and globs (data.check.check_data_config), and the
  validation sources (eval.sources) the same way;
- the tokenizer: `builtin`, a folder that holds one, or a hub id; when it is on this machine it is loaded
  (it is cached for the run) and its size checked against model.vocab_size;
- model.pretrained: a folder (or a hub id already in the local cache) with a Llama config.json whose shapes
  match the model group, and safetensors weights;
- checkpoint.resume: a complete checkpoint (or, with auto, the newest complete one in checkpoint.dir) of a model
  with the same shapes.
Every rank runs the same checks on the same inputs, so every rank fails the same way; only rank 0 prints
(train.py). Whatever needs the network (a hub tokenizer, hub weights, hub datasets) is checked where it is
fetched, after the process group exists, and ends the same way: one line naming the key, exit status 2.
"""

from __future__ import annotations

import os

from huggingface_hub import try_to_load_from_cache
from omegaconf import DictConfig, OmegaConf

from lemur_torch import commit
from lemur_torch.checkpoint import META, latest_checkpoint
from lemur_torch.data.check import check_data_config, check_source
from lemur_torch.errors import ConfigError
from lemur_torch.export import check_export_target
from lemur_torch.hub import local_or_hub
from lemur_torch.tokenizer import BUILTIN, TOKENIZER_FILES, build_tokenizer, check_vocab_size
from lemur_torch.weights import SHAPE_KEYS, check_pretrained_config

# the shapes a checkpoint must share with the model group: the pretrained folder's, and the vocabulary
ARCHITECTURE_KEYS = ("vocab_size", *SHAPE_KEYS)


def check_inputs(cfg: DictConfig) -> None:
    """Raise ConfigError (or a DataConfigError with a key) for the first input that cannot work; the cheap
    checks first, loading the tokenizer last."""
    check_data_config(cfg.data)
    check_validation_sources(cfg)
    check_resume(cfg)
    check_export(cfg)
    check_pretrained(cfg)
    check_tokenizer(cfg)


def check_validation_sources(cfg: DictConfig) -> None:
    """eval.sources, when validation runs, as the training sources are checked (kind, domain, fields, paths)."""
    if cfg.eval.every_steps:
        for name, scfg in cfg.eval.sources.items():
            check_source(str(name), scfg, cfg.data.format, prefix="eval.sources")


def check_export(cfg: DictConfig) -> None:
    """The end-of-run export would replace its folder: refuse one that holds anything not an earlier export
    (the run or checkpoint folder, someone's files) now, not after the training."""
    c = cfg.checkpoint
    if c.export_at_end and c.export_dir:
        check_export_target(c.export_dir, cfg.run_dir, c.dir)


def check_tokenizer(cfg: DictConfig) -> None:
    name = cfg.data.tokenizer
    if name != BUILTIN:
        try:
            where, path = local_or_hub(name)
        except ValueError as exc:
            raise ConfigError(
                "data.tokenizer",
                f"{exc}; give a tokenizer folder, a hub id (e.g. meta-llama/Llama-2-70b-hf) or builtin",
            ) from None
        if where == "hub":
            return  # fetched once the process group exists; its size is checked then (train.build_and_fit)
        if not os.path.isdir(path):
            raise ConfigError(
                "data.tokenizer", f"folder {name} does not exist; give a tokenizer folder, a hub id or builtin"
            )
        if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
            raise ConfigError(
                "data.tokenizer", f"{name} holds none of {', '.join(TOKENIZER_FILES)}; point it at a tokenizer folder"
            )
    check_vocab_size(build_tokenizer(cfg.data), cfg.model.vocab_size)


def check_pretrained(cfg: DictConfig) -> None:
    name = cfg.model.pretrained
    if not name:
        return
    try:
        where, path = local_or_hub(name)
    except ValueError as exc:
        raise ConfigError("model.pretrained", f"{exc}; give an HF model folder or hub id") from None
    if where == "hub":
        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            return  # downloaded by rank 0 once the process group exists, and checked then
        path = os.path.dirname(cached)  # the weights may not be in the cache yet: the config is checked here
    elif not os.path.isdir(path):
        raise ConfigError(
            "model.pretrained",
            f"folder {name} does not exist; give an HF model folder, a hub id, or null for random init",
        )
    check_pretrained_config(path, cfg.model, weights=where == "local")


def check_resume(cfg: DictConfig) -> None:
    resume = cfg.checkpoint.resume
    if resume == "none":
        return
    if resume == "auto":
        path = latest_checkpoint(cfg.checkpoint.dir)
        if path is None:
            return
    else:
        path = resume
        if not os.path.isdir(path):
            raise ConfigError(
                "checkpoint.resume",
                f"{path} does not exist; use auto (the newest complete checkpoint in "
                "checkpoint.dir), none (start fresh) or a step_* folder",
            )
        if not commit.is_complete(path, META):
            raise ConfigError(
                "checkpoint.resume",
                f"{path} is not a complete checkpoint (no meta.json: a save that did not "
                "finish, or not a step_* folder); pick a complete one or use auto",
            )
    _check_same_model(path, cfg)


def _check_same_model(path: str, cfg: DictConfig) -> None:
    saved_file = os.path.join(path, "config.yaml")
    if not os.path.exists(saved_file):
        return
    saved = OmegaConf.load(saved_file).get("model", {})
    for key in ARCHITECTURE_KEYS:
        if key in saved and saved[key] != cfg.model[key]:
            raise ConfigError(
                f"model.{key}",
                f"{cfg.model[key]} but checkpoint {path} was trained with {saved[key]}; "
                "resume with the same model settings, or set checkpoint.resume=none",
            )
