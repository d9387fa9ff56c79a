"""Memory planner: shard the real model on the meta device over a fake process group of any world size.

`python -m lemur_torch.plan --world-size 512 model=llama2_70b` applies the exact FSDP2 wrapping that
training uses (parallel/fsdp.py) to a meta model over a fake 512-rank group, in about a second, and reports
per-rank parameter counts and the persistent per-rank state (fp32 params + grads + AdamW moments = 16 bytes
per parameter, RECIPE.md). Activation memory is not modelled: it is an estimate of the sharded state only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch.distributed as dist
from omegaconf import DictConfig


def shard_on_fake_pg(cfg: DictConfig, world_size: int, rank: int = 0) -> Dict[str, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lemur_torch.model import build_meta_model, count_params
    from lemur_torch.parallel.fsdp import apply_fsdp

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
        model = build_meta_model(cfg.model)
        apply_fsdp(model, mesh, cfg.parallel, MixedPrecisionPolicy())
        local = sum(p.to_local().numel() for p in model.parameters())
        layer_max = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
        total = count_params(cfg.model)
        return {
            "world_size": world_size,
            "total_params": total,
            "local_params": local,
            "largest_layer_params": layer_max,
            "state_gib_per_rank": local * 16 / 2**30,
            "bf16_layer_gather_gib": layer_max * 2 / 2**30,
        }
    finally:
        dist.destroy_process_group()


def main(argv: List[str] = None) -> int:
    from lemur_torch.config import load_config

    parser = argparse.ArgumentParser(prog="python -m lemur_torch.plan")
    parser.add_argument("--world-size", type=int, default=512)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.overrides)
    print(json.dumps(shard_on_fake_pg(cfg, args.world_size), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
