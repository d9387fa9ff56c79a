"""`model.pretrained`: where the weights are, whether they fit the model group, and the rows a larger
vocabulary adds. Shared by both backends and the gate (lemur_torch.preflight).

- `resolve_pretrained`: the FSDP backend's complete local folder: a folder as it is, a hub id from this node's
  HF cache or downloaded once per node under a file lock (no collective: the other ranks never sit in a
  barrier during a 130 GB download).
- `pretrained_location`: the XLA backend's location to read by byte range (a folder, a URL, `hf://<id>`).
- `check_pretrained_config`: a Llama config.json whose shapes match the model group; the checkpoint's
  vocabulary size.
- `pad_vocab_rows`: a checkpoint with a smaller vocabulary (Llama-2's 32000 under the chat stage's 32064 =
  32000 + ChatML tokens, padded to a multiple of 64) fills the first rows of the embedding and lm_head; the
  new rows start at the mean of the existing ones.
"""

from __future__ import annotations

import json
import logging
import os

import fsspec
import huggingface_hub
import torch
from filelock import FileLock
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from omegaconf import DictConfig

from lemur_torch.errors import ConfigError
from lemur_torch.weights.files import is_remote

log = logging.getLogger(__name__)

# the tensors whose first dimension is the vocabulary
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
# the model group's keys a pretrained folder or a checkpoint must match (the vocabulary may grow: checked apart)
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
_PRETRAINED_FILES = ["*.safetensors", "*.json", "tokenizer.model"]


def resolve_pretrained(name: str) -> str:
    """The complete local folder of `model.pretrained` on this node (config.json and every safetensors shard).

    A local folder is used as it is. A hub id is looked up in this node's HF cache first, without any network
    (so `HF_HUB_OFFLINE=1` with a pre-filled cache works); if it is missing or incomplete there, it is
    downloaded once per node: every process of the node takes a file lock in the cache, the first to get it
    downloads, the others then find it complete. A cache that all nodes share (one file system, one lock) is
    downloaded once in total. Anything missing is one ConfigError naming model.pretrained.
    """
    if os.path.isdir(name):
        return check_pretrained_folder(name, name)
    if os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise ConfigError(
            "model.pretrained", f"{name}: no such folder (and not a hub id such as meta-llama/Llama-2-70b-hf)"
        )
    cached = _cached_snapshot(name)
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "model.pretrained",
            f"{name} is not complete in this node's HF cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it: fill the cache on every node (or share one), or set model.pretrained to a local folder",
        )
    lock = os.path.join(constants.HF_HUB_CACHE, ".locks", "lemur-torch--" + name.replace("/", "--") + ".lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with FileLock(lock):
        cached = _cached_snapshot(name)  # another process of this node (or of any node, on a shared cache) got it
        if cached is None:
            log.warning("downloading %s into %s (once for this node)", name, constants.HF_HUB_CACHE)
            cached = check_pretrained_folder(
                huggingface_hub.snapshot_download(name, allow_patterns=_PRETRAINED_FILES), name
            )
    return cached


def _cached_snapshot(name: str):
    """The cached snapshot folder of hub id `name` if it is complete, else None; never touches the network.
    (huggingface_hub.snapshot_download is looked up at each call, here and below, so that a test can stand in
    for the hub.)"""
    try:
        folder = huggingface_hub.snapshot_download(name, allow_patterns=_PRETRAINED_FILES, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    try:
        return check_pretrained_folder(folder, name)
    except ConfigError:
        return None


def check_pretrained_folder(folder: str, name: str) -> str:
    """`folder` if it holds config.json and all its safetensors weights (every shard its index names)."""

    def missing(what: str) -> ConfigError:
        return ConfigError(
            "model.pretrained",
            f"{name}: {folder} is incomplete ({what} missing); re-download it or point model.pretrained at a "
            "complete HF folder",
        )

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise missing("config.json")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if absent:
            raise missing(f"{len(absent)} of {len(shards)} shards, e.g. {absent[0]}")
    elif not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        raise missing("*.safetensors weights")
    return folder


def pretrained_location(name: str) -> str:
    """`model.pretrained` as a location to read from: a folder or URL as is; a hub id as `hf://<id>` (read by
    range from the hub: no download to disk), or its cached snapshot when the hub is offline."""
    if os.path.isdir(name) or is_remote(name):
        return name
    if constants.HF_HUB_OFFLINE:
        return huggingface_hub.snapshot_download(
            name, allow_patterns=["*.safetensors", "*.json"], local_files_only=True
        )
    return f"hf://{name}"


def check_pretrained_config(path: str, model_cfg: DictConfig, weights: bool = True) -> int:
    """Fail (ConfigError naming the key) unless `path` holds Llama weights (with `weights`: the safetensors too)
    whose architecture matches the model group; return the checkpoint's vocabulary size (<= model.vocab_size).
    `path` is a folder or an fsspec URL (the XLA backend reads gs://, hf:// by range)."""
    fs, root = fsspec.core.url_to_fs(path.rstrip("/"))
    try:
        with fs.open(f"{root}/config.json") as f:
            hf = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "model.pretrained", f"cannot read {path}/config.json ({exc}); point it at an HF model folder"
        ) from None
    if hf.get("model_type") != "llama":
        raise ConfigError(
            "model.pretrained",
            f"{path} holds a {hf.get('model_type')!r} model ({', '.join(hf.get('architectures') or [])}); "
            "lemur-torch trains LlamaForCausalLM",
        )
    if weights and not fs.glob(f"{root}/*.safetensors"):
        raise ConfigError(
            "model.pretrained",
            f"{path} has no *.safetensors weights (convert .bin weights with transformers' save_pretrained)",
        )
    for key in SHAPE_KEYS:
        if key in hf and hf[key] != model_cfg[key]:
            raise ConfigError(
                f"model.{key}", f"{model_cfg[key]} but {path}/config.json has {hf[key]}; pick the matching model= group"
            )
    vocab = int(hf.get("vocab_size", model_cfg.vocab_size))
    if vocab > model_cfg.vocab_size:
        raise ConfigError("model.vocab_size", f"{model_cfg.vocab_size} is smaller than the checkpoint's {vocab}")
    return vocab


def pad_vocab_rows(rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A pretrained embedding or lm_head ([checkpoint vocabulary, hidden]) grown to `vocab_size` rows: the new
    rows (tokens the checkpoint never saw) start at the mean of the existing ones."""
    return torch.cat([rows, rows.mean(0, keepdim=True).expand(vocab_size - rows.shape[0], -1)])
