"""The settings that fit, ranked by predicted step time, for the run's global batch on a cluster.

Varied: micro-batch x gradient accumulation (every split of the global batch), activation checkpointing
(none, full, every 2nd or 4th layer, selective), the HSDP shard group (a node, 2, 4, ... nodes, or all
devices), whether the last layer reshards after forward, the gradient reduce dtype, compile, and
`parallel.float8` (tensorwise, rowwise) where the device has fp8 tensor cores. Each candidate says which
overrides give it, and which of them the trainer does not take yet (`pending`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from omegaconf import DictConfig

from lemur_torch.plan.cluster import Cluster
from lemur_torch.plan.predict import Plan, local_params, predict
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape

# settings the planner can rank before the trainer takes them (the keys they will have)
PENDING_KEYS = ("parallel.activation_checkpointing=selective", "parallel.reduce_dtype", "parallel.reshard_last_layer")


@dataclass
class Candidate:
    plan: Plan
    overrides: List[str]
    pending: List[str]


def micro_batches(s: Setting, cluster: Cluster, global_tokens: int) -> List[int]:
    rows = global_tokens // s.seq_len
    if rows * s.seq_len != global_tokens:
        return []
    per_device, rest = divmod(rows, cluster.devices)
    return [m for m in range(1, per_device + 1) if not rest and per_device % m == 0]


def shard_sizes(s: Setting, cluster: Cluster) -> List[int]:
    if s.backend != "fsdp":
        return [cluster.devices]
    sizes, size = [], min(cluster.devices_per_node, cluster.devices)
    while size < cluster.devices:
        if cluster.devices % size == 0:
            sizes.append(size)
        size *= 2
    return sizes + [cluster.devices]


def overrides_for(s: Setting, cluster: Cluster) -> List[str]:
    micro = s.micro_batch * (cluster.devices_per_node if s.backend == "xla_spmd" else 1)
    out = [f"train.micro_batch_size={micro}", f"parallel.activation_checkpointing={s.ac}"]
    if s.ac == "every_n":
        out.append(f"parallel.ac_every_n={s.ac_every_n}")
    if s.backend == "fsdp":
        out.append(f"parallel.dp_replicate={s.dp_replicate}")
        out.append(f"parallel.compile={str(s.compile).lower()}")
        if s.reduce_dtype != "fp32":
            out.append(f"parallel.reduce_dtype={s.reduce_dtype}")
        if not s.reshard_last:
            out.append("parallel.reshard_last_layer=false")
    if s.float8:
        out.append(f"parallel.float8={s.float8_recipe}")
    return out


def search(
    shape: ModelShape,
    base: Setting,
    cluster: Cluster,
    global_tokens: int,
    max_steps: int,
    model_cfg: Optional[DictConfig] = None,
    float8_available: bool = False,
) -> List[Candidate]:
    """Every candidate that fits, fastest first."""
    fsdp = base.backend == "fsdp"
    # (float8, recipe); mxfp8 is modelled as rowwise (bf16 all-gather), so it is not searched apart
    fp8 = [(False, "tensorwise")]
    if float8_available and cluster.device.fp8_mamf:
        fp8 += [(True, "tensorwise"), (True, "rowwise")]
    policies = [("none", 2), ("full", 2), ("every_n", 2), ("every_n", 4), ("selective", 2)]
    local: Dict[int, int] = {}
    found: List[Candidate] = []
    for size in shard_sizes(base, cluster):
        replicate = cluster.devices // size
        probe = base.replace(dp_replicate=replicate if fsdp else 1)
        local[size] = local_params(shape, probe, cluster, model_cfg)
        for micro, (ac, n), reshard_last, reduce, compiled, (f8, recipe) in itertools.product(
            micro_batches(base, cluster, global_tokens),
            policies,
            [True, False] if fsdp else [True],
            ["fp32", "bf16"] if fsdp else ["fp32"],
            [False, True] if fsdp else [True],
            fp8,
        ):
            s = probe.replace(
                micro_batch=micro,
                grad_accum=global_tokens // (micro * base.seq_len * cluster.devices),
                ac=ac,
                ac_every_n=n,
                reshard_last=reshard_last,
                reduce_dtype=reduce,
                compile=compiled,
                float8=f8,
                float8_recipe=recipe,
            )
            plan = predict(shape, s, cluster, max_steps, model_cfg, local=local[size])
            if not plan.fits:
                continue
            overrides = overrides_for(s, cluster)
            pending = [o for o in overrides if any(o.startswith(k) for k in PENDING_KEYS)]
            found.append(Candidate(plan, overrides, pending))
    # within 1% of each other, settings are told apart by what they need: fewer keys the trainer does not take
    # yet, fewer changes to the run's own settings, less memory
    own = set(overrides_for(base, cluster))
    best = min((c.plan.step_time_s for c in found), default=1.0)
    found.sort(
        key=lambda c: (
            math.floor(math.log(c.plan.step_time_s / best) / math.log(1.01)),
            len(c.pending),
            len(set(c.overrides) - own),
            c.plan.memory.peak,
        )
    )
    return found
