"""The real FSDP2 sharding of the run's model: the meta model wrapped by parallel/fsdp.py's own `apply_fsdp`
over a fake process group of any size, in about a second.

`python -m lemur_torch.plan --world-size 512 model=llama2_70b` prints this sharding alone as JSON: per-rank
parameter counts and the persistent per-rank state (fp32 params + grads + AdamW moments = 16 bytes per
parameter). The plan itself uses the closed form of the same rule (lemur_torch.plan.shape.padded_shard), which
tests/test_plan.py checks against this wrapping for several shapes and world sizes.
"""

from __future__ import annotations

from typing import Dict

import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.testing._internal.distributed.fake_pg import FakeStore

from lemur_torch.model import build_meta_model, count_params
from lemur_torch.parallel.fsdp import apply_fsdp


def shard_on_fake_pg(cfg: DictConfig, world_size: int, rank: int = 0) -> Dict[str, float]:
    """Rank `rank`'s share of the model wrapped exactly as training wraps it, over `world_size` fake ranks.
    `padded_local_params` counts what FSDP2 allocates per rank (ceil(dim0 / ranks) rows of every tensor: the
    most any rank holds), `local_params` the rows this rank owns."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
        model = build_meta_model(cfg.model)
        apply_fsdp(model, mesh, cfg.parallel, MixedPrecisionPolicy())
        params = list(model.parameters())
        # one rank: apply_fsdp leaves fp32 parameters unsharded (plain tensors, no DTensor)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
        padded = sum(-(-p.shape[0] // world_size) * (p.numel() // p.shape[0]) for p in params)
        layer_max = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
        total = count_params(cfg.model)
        return {
            "world_size": world_size,
            "total_params": total,
            "local_params": local,
            "padded_local_params": padded,
            "largest_layer_params": layer_max,
            "state_gib_per_rank": local * 16 / 2**30,
            "bf16_layer_gather_gib": layer_max * 2 / 2**30,
        }
    finally:
        dist.destroy_process_group()
