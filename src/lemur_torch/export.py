"""HF export: a folder that `AutoModelForCausalLM.from_pretrained`, vLLM and TGI load as it is.

`export_model` writes sharded safetensors (through the backend, without gathering the full model on one
rank), config.json and the tokenizer, and commits the folder like a checkpoint (lemur_torch.commit, with
`checkpoint.commit`), its marker `lemur_export.json` last. The marker is also what makes a folder replaceable:
an export replaces only an earlier export (or an empty folder), never a folder without the marker, and never
the run folder, the checkpoint folder or anything inside it; `check_export_target` says so before training.
`lemur-export CHECKPOINT OUT` does the same offline from a training checkpoint (any world size: run it under
torchrun to spread a 70B model's memory over several processes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch import commit
from lemur_torch.errors import ConfigError
from lemur_torch.model import hf_llama_config
from lemur_torch.parallel import build_backend
from lemur_torch.parallel.base import Backend
from lemur_torch.tokenizer import build_tokenizer, generation_config, serving_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


EXPORT_MARKER = "lemur_export.json"


def check_export_target(out_dir: str, run_dir: str, checkpoint_dir: str, key: str = "checkpoint.export_dir") -> None:
    """Refuse an output folder whose replacement would lose something: the run folder or any folder holding it,
    the checkpoint folder, a folder holding it or inside it, or an existing non-empty folder that is not an
    earlier export. Raises ConfigError naming `key`."""
    out = os.path.realpath(out_dir)
    run, ckpt = os.path.realpath(run_dir), os.path.realpath(checkpoint_dir)
    if out == run or run.startswith(out + os.sep):
        raise ConfigError(key, f"{out_dir} is or holds the run folder {run_dir}: give the export a folder of its own")
    if out == ckpt or ckpt.startswith(out + os.sep) or out.startswith(ckpt + os.sep):
        raise ConfigError(
            key,
            f"{out_dir} is, holds or lies inside the checkpoint folder {checkpoint_dir}: give the "
            f"export a folder of its own",
        )
    if os.path.lexists(out) and not commit.is_complete(out, EXPORT_MARKER):
        if not os.path.isdir(out) or os.listdir(out):
            raise ConfigError(
                key,
                f"{out_dir} exists and is not a lemur-torch export (no {EXPORT_MARKER}): refusing to "
                f"replace it; remove it yourself or choose another folder",
            )


def export_model(backend: Backend, model, cfg: DictConfig, tokenizer, out_dir: str, source: str = "") -> str:
    out_dir = os.path.abspath(out_dir)
    mode = cfg.checkpoint.commit
    if backend.is_main:
        check_export_target(out_dir, cfg.run_dir, cfg.checkpoint.dir)
        commit.begin(out_dir, mode, EXPORT_MARKER)
    backend.barrier()
    staging = commit.staging_path(out_dir, mode)
    dtype = _DTYPES[cfg.checkpoint.export_dtype]
    backend.export_hf(model, staging, cfg.checkpoint.max_shard_size_mb, dtype)
    if backend.is_main:
        config = hf_llama_config(cfg.model)
        config.dtype = dtype
        config.use_cache = True  # inference default for the exported model
        # whatever kernel the run trained with (flash, flex, xla_flash), the export names one that every
        # torch has: a config naming flash attention fails to load where flash-attn is not installed
        config.attn_implementation = "sdpa"
        config.save_pretrained(staging)
        if tokenizer is not None:
            serving_tokenizer(tokenizer).save_pretrained(staging)
            gen = generation_config(tokenizer)  # chat models: generate() stops at <|im_end|>
            if gen is not None:
                gen.save_pretrained(staging)
        marker = {
            "lemur_torch_export": True,
            "source": source,
            "dtype": cfg.checkpoint.export_dtype,
            "time": time.time(),
        }
        commit.commit(staging, out_dir, mode, EXPORT_MARKER, json.dumps(marker, indent=1).encode())
    backend.barrier()
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lemur-export", description="Export a lemur-torch checkpoint to an HF folder")
    parser.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("out", help="output folder (created; replaces only an earlier export)")
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="weights dtype (default: the run's checkpoint.export_dtype)",
    )
    args = parser.parse_args(argv)
    cfg_file = os.path.join(args.checkpoint, "config.yaml")
    if not os.path.exists(os.path.join(args.checkpoint, "meta.json")) or not os.path.exists(cfg_file):
        print(
            f"lemur-export: {args.checkpoint} is not a complete lemur-torch checkpoint (meta.json/config.yaml missing)",
            file=sys.stderr,
        )
        return 2
    cfg = OmegaConf.load(cfg_file)
    cfg.checkpoint.dir = os.path.dirname(os.path.abspath(args.checkpoint))  # where it is now
    try:
        check_export_target(args.out, cfg.run_dir, cfg.checkpoint.dir, key="out")
    except ConfigError as exc:
        print(f"lemur-export: {exc}", file=sys.stderr)
        return 2
    if args.dtype:
        cfg.checkpoint.export_dtype = args.dtype
    if cfg.parallel.backend == "xla_spmd":
        cfg.parallel.backend = "fsdp"  # both backends write the same DCP keys; export on CPU/GPU
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 1, -1
    cfg.parallel.activation_checkpointing, cfg.parallel.compile = "none", False
    # checkpoints hold plain weights whatever the run's float8, and its recipe may need a GPU this machine lacks
    cfg.parallel.float8 = "none"
    cfg.model.attention = "sdpa"  # exporting runs no attention, and the run's kernel may not exist here
    backend = build_backend(cfg)
    model = backend.setup_model(cfg, init_weights=False)
    state = backend.state_dict_for_checkpoint(model, None)
    backend.dcp_load(state, args.checkpoint)
    backend.load_state_dict_from_checkpoint(model, None, state)
    out = export_model(
        backend, model, cfg, build_tokenizer(cfg.data), args.out, source=os.path.abspath(args.checkpoint)
    )
    if backend.is_main:
        print(f"exported {args.checkpoint} -> {out}")
    backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
