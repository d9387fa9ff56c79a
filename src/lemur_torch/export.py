"""HF export: a folder that `AutoModelForCausalLM.from_pretrained`, vLLM and TGI load as it is.

`export_model` writes sharded safetensors (through the backend, without gathering the full model on one
rank), config.json and the tokenizer, into a temporary folder renamed into place when complete.
`lemur-export CHECKPOINT OUT` does the same offline from a training checkpoint (any world size: run it under
torchrun to spread a 70B model's memory over several processes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch.model import hf_llama_config
from lemur_torch.parallel.base import Backend
from lemur_torch.tokenizer import generation_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_model(backend: Backend, model, cfg: DictConfig, tokenizer, out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir.rstrip("/") + ".tmp"
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    backend.barrier()
    dtype = _DTYPES[cfg.checkpoint.export_dtype]
    backend.export_hf(model, tmp, cfg.checkpoint.max_shard_size_mb, dtype)
    if backend.is_main:
        config = hf_llama_config(cfg.model)
        config.dtype = dtype
        config.use_cache = True  # inference default for the exported model
        # whatever kernel the run trained with (flash, flex, xla_flash), the export names one that every
        # torch has: a config naming flash attention fails to load where flash-attn is not installed
        config.attn_implementation = "sdpa"
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            gen = generation_config(tokenizer)  # chat models: generate() stops at <|im_end|>
            if gen is not None:
                gen.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    backend.barrier()
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lemur-export", description="Export a lemur-torch checkpoint to an HF folder")
    parser.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_XXXXXXXX)")
    parser.add_argument("out", help="output folder (created; replaced if it exists)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="weights dtype (default: the run's checkpoint.export_dtype)")
    args = parser.parse_args(argv)
    cfg_file = os.path.join(args.checkpoint, "config.yaml")
    if not os.path.exists(os.path.join(args.checkpoint, "meta.json")) or not os.path.exists(cfg_file):
        print(f"lemur-export: {args.checkpoint} is not a complete lemur-torch checkpoint (meta.json/config.yaml missing)", file=sys.stderr)
        return 2
    from lemur_torch.parallel import build_backend
    from lemur_torch.tokenizer import build_tokenizer

    cfg = OmegaConf.load(cfg_file)
    if args.dtype:
        cfg.checkpoint.export_dtype = args.dtype
    if cfg.parallel.backend == "xla_spmd":
        cfg.parallel.backend = "fsdp"  # both backends write the same DCP keys; export on CPU/GPU
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 1, -1
    cfg.parallel.activation_checkpointing, cfg.parallel.compile = "none", False
    cfg.model.attention = "sdpa"  # exporting runs no attention, and the run's kernel may not exist here
    backend = build_backend(cfg)
    model = backend.setup_model(cfg, init_weights=False)
    state = backend.state_dict_for_checkpoint(model, None)
    backend.dcp_load(state, args.checkpoint)
    backend.load_state_dict_from_checkpoint(model, None, state)
    out = export_model(backend, model, cfg, build_tokenizer(cfg.data), args.out)
    if backend.is_main:
        print(f"exported {args.checkpoint} -> {out}")
    backend.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
