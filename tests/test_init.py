"""Random init at scale: each rank draws only its own shard, and the values do not depend on the sharding.

References: the unsharded init of one process, assembled shard by shard from fake-process-group ranks (any
world size, HSDP's 2-D mesh, a tensor cut along its second dimension, the torch_xla backend's piecewise init),
and, for memory, the byte sizes of the shard and of one decoder layer computed from the model itself.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import subprocess_env
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.testing._internal.distributed.fake_pg import FakeStore

from lemur_torch.config import load_config
from lemur_torch.model import build_meta_model, clean_fqn, full_shape_and_slices, init_weights
from lemur_torch.parallel.fsdp import apply_fsdp

SEED, STD = 1234, 0.02
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "init_rank_memory.py")


@pytest.mark.slow
def test_70b_rank_of_512_draws_only_its_shard():
    proc = subprocess.run(
        [sys.executable, SCRIPT, "llama2_70b", "512", "357"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(m)
    # ~69e9 / 512 parameters of fp32 = ~514 MiB written by init; everything else init allocated on top of it
    # must stay far below one unsharded decoder layer (3.4 GB in fp32), let alone the 1 GB embedding that
    # drawing a full tensor per rank would allocate
    assert 500 * 2**20 < m["shard_bytes"] < 530 * 2**20
    extra = m["peak_growth_bytes"] - m["shard_bytes"]
    assert extra < m["layer_bytes"] / 32 and extra < m["largest_tensor_bytes"] / 8, m


def _full_from_ranks(world_shape, dim_names, model_name="tiny"):
    """Every rank of a fake process group in turn: shard like training, init, keep its local slices."""
    cfg = load_config([f"model={model_name}"])
    full = {}
    world = 1
    for n in world_shape:
        world *= n
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            # names unique per simulated rank: DTensor reuses an equal mesh seen earlier in the process, which
            # would carry an earlier rank's coordinate
            mesh = init_device_mesh("cpu", world_shape, mesh_dim_names=tuple(f"{n}{rank}" for n in dim_names))
            model = build_meta_model(cfg.model)
            apply_fsdp(model, mesh, cfg.parallel, MixedPrecisionPolicy())
            model.to_empty(device="cpu")
            init_weights(model, SEED, STD)
            for name, p in model.named_parameters():
                shape, slices = full_shape_and_slices(p)
                out = full.setdefault(clean_fqn(name), torch.full(shape, float("nan")))
                out[slices] = p.to_local()
        finally:
            dist.destroy_process_group()
    return full


def test_any_sharding_gives_the_same_weights():
    cfg = load_config(["model=tiny"])
    one = build_meta_model(cfg.model)
    one.to_empty(device="cpu")
    init_weights(one, SEED, STD)
    reference = {n: p.detach() for n, p in one.named_parameters()}
    assert reference["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(STD, rel=0.05)
    for world_shape, names in (((3,), ("dp_shard",)), ((2, 4), ("dp_replicate", "dp_shard"))):
        full = _full_from_ranks(world_shape, names)
        assert full.keys() == reference.keys()
        for name, value in reference.items():
            assert torch.equal(full[name], value), (world_shape, name)
    # the torch_xla backend initialises whole pieces (a decoder layer at a time) under their full names
    layer = build_meta_model(cfg.model).model.layers[1]
    layer.to_empty(device="cpu")
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleList([nn.Identity(), layer])
    init_weights(holder, SEED, STD)
    for name, p in layer.named_parameters():
        assert torch.equal(p, reference[f"model.layers.1.{name}"]), name


def test_a_cut_along_the_second_dimension_draws_the_same_values():
    from torch.distributed.tensor import Shard, distribute_tensor

    ref = nn.Linear(37, 2003, bias=False)  # 74k elements: several init blocks
    init_weights(ref, SEED, STD)
    full = torch.full_like(ref.weight, float("nan"))
    for rank in range(4):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=4)
        try:
            mesh = init_device_mesh("cpu", (4,), mesh_dim_names=(f"tp{rank}",))
            mod = nn.Linear(37, 2003, bias=False)
            mod.weight = nn.Parameter(distribute_tensor(torch.zeros(2003, 37), mesh, [Shard(1)]))
            init_weights(mod, SEED, STD)
            _, slices = full_shape_and_slices(mod.weight)
            full[slices] = mod.weight.to_local()
        finally:
            dist.destroy_process_group()
    assert torch.equal(full, ref.weight.detach())
