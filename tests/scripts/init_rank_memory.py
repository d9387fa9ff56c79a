"""One rank's random init of a sharded model over a fake process group: `python init_rank_memory.py MODEL WORLD RANK`.

Shards the meta model exactly as training does (parallel/fsdp.py apply_fsdp), materialises the local shards
(uninitialised pages: not yet resident), then runs init_weights and prints, as JSON, how much the process's
peak resident memory grew during init next to the bytes of the local shard, one full decoder layer and the
largest full tensor, and the init time. Run in its own process so the peak belongs to this init alone.
"""

import json
import resource
import sys
import time

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.testing._internal.distributed.fake_pg import FakeStore

from lemur_torch.config import load_config
from lemur_torch.model import build_meta_model, init_weights
from lemur_torch.parallel.fsdp import apply_fsdp


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    model_name, world, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = load_config([f"model={model_name}"])
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    model = build_meta_model(cfg.model)
    apply_fsdp(model, mesh, cfg.parallel, MixedPrecisionPolicy())
    layer_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    largest_bytes = max(p.numel() for p in model.parameters()) * 4
    model.to_empty(device="cpu")
    shard_bytes = sum(p.to_local().numel() for p in model.parameters()) * 4
    before = peak_rss_bytes()
    t0 = time.perf_counter()
    init_weights(model, cfg.train.seed, cfg.model.initializer_range)
    seconds = time.perf_counter() - t0
    grown = peak_rss_bytes() - before
    print(
        json.dumps(
            {
                "model": model_name,
                "world": world,
                "rank": rank,
                "init_s": seconds,
                "peak_growth_bytes": grown,
                "shard_bytes": shard_bytes,
                "layer_bytes": layer_bytes,
                "largest_tensor_bytes": largest_bytes,
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
