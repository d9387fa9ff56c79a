"""A local stand-in for the HF hub: a small real Llama folder, and HF caches filled from it as a download would."""

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from lemur_torch.config import load_config
from lemur_torch.model import hf_llama_config


def make_hub_folder(path: Path) -> Path:
    """A small real HF Llama folder (several shards + index), the 'hub' the caches are filled from."""
    cfg = load_config(["model=tiny"])
    torch.manual_seed(11)
    LlamaForCausalLM(hf_llama_config(cfg.model)).save_pretrained(path, max_shard_size="3MB")
    return path


def fill_hf_cache(cache: Path, repo_id: str, hub_folder: Path) -> Path:
    """The layout huggingface_hub's downloads leave in HF_HUB_CACHE (files copied instead of blob symlinks)."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit_hash = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit_hash)
    shutil.copytree(hub_folder, repo / "snapshots" / commit_hash)
    return repo / "snapshots" / commit_hash
