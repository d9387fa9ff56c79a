"""The settings that fit, ranked by predicted step time, for the run's global batch on a cluster.

Varied: micro-batch x gradient accumulation (every split of the global batch), activation checkpointing (none,
full, every 2nd or 4th layer, and on the FSDP backend selective), the FSDP backend's HSDP shard group (a node,
2, 4, ... nodes, or all devices), whether its last layer reshards after forward, its gradient reduce dtype and
compile; the XLA backend's tensor axis (1, 2, 4); `parallel.float8` (tensorwise, rowwise) where the device has
fp8 tensor cores and the config has the key. Each candidate says which overrides give it, and which of those the
run's config does not have as keys (`pending`: settings the trainer does not take yet).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Collection, Dict, List, Optional, Tuple

from lemur_torch.plan.cluster import Cluster
from lemur_torch.plan.predict import Plan, local_params, predict
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape

FSDP_POLICIES = [("none", 2), ("full", 2), ("every_n", 2), ("every_n", 4), ("selective", 2)]
# the XLA backend rematerialises whole layers only (lemur_torch/parallel/xla/rules.py)
XLA_POLICIES = [("none", 2), ("full", 2), ("every_n", 2), ("every_n", 4)]


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
        out.append(f"parallel.reduce_dtype={s.reduce_dtype}")
        out.append(f"parallel.reshard_last_layer={str(s.reshard_last).lower()}")
    else:
        out.append(f"parallel.xla_tensor={s.tensor}")
    if s.float8:
        out.append(f"parallel.float8={s.float8_recipe}")
    return out


def variants(base: Setting, cluster: Cluster, float8_available: bool) -> List[Tuple]:
    """(shard group, tensor axis, policy, reshard_last, reduce dtype, compile, float8) combinations to try."""
    # (float8, recipe); mxfp8 is modelled as rowwise (bf16 all-gather), so it is not searched apart
    fp8 = [(False, "tensorwise")]
    if float8_available and cluster.device.fp8_mamf:
        fp8 += [(True, "tensorwise"), (True, "rowwise")]
    if base.backend == "fsdp":
        return list(
            itertools.product(
                shard_sizes(base, cluster), [1], FSDP_POLICIES, [True, False], ["fp32", "bf16"], [False, True], fp8
            )
        )
    policies = [p for p in XLA_POLICIES if not (base.scan_layers and p[0] == "every_n")]
    tensors = [t for t in (1, 2, 4) if cluster.devices % t == 0 and t <= cluster.devices_per_node]
    return list(itertools.product([cluster.devices], tensors, policies, [True], ["fp32"], [True], fp8))


def search(
    shape: ModelShape,
    base: Setting,
    cluster: Cluster,
    global_tokens: int,
    max_steps: int,
    float8_available: bool = False,
    known_keys: Optional[Collection[str]] = None,
) -> List[Candidate]:
    """Every candidate that fits, fastest first. `known_keys`: the run config's keys (`parallel.reduce_dtype`...);
    an override of another key is `pending`."""
    fsdp = base.backend == "fsdp"
    local: Dict[Tuple[int, int], int] = {}
    found: List[Candidate] = []
    micros = micro_batches(base, cluster, global_tokens)
    for (size, tensor, (ac, n), reshard_last, reduce, compiled, (f8, recipe)), micro in itertools.product(
        variants(base, cluster, float8_available), micros
    ):
        probe = base.replace(dp_replicate=cluster.devices // size if fsdp else 1, tensor=tensor)
        if (size, tensor) not in local:
            local[size, tensor] = local_params(shape, probe, cluster)
        s = probe.replace(
            micro_batch=micro,
            grad_accum=global_tokens // (micro * base.seq_len * cluster.devices),
            ac=ac,
            ac_every_n=n,
            reshard_last=reshard_last and base.reshard_after_forward,
            reduce_dtype=reduce,
            compile=compiled,
            float8=f8,
            float8_recipe=recipe,
        )
        plan = predict(shape, s, cluster, max_steps, local=local[size, tensor])
        if not plan.fits:
            continue
        overrides = overrides_for(s, cluster)
        keys = [o.split("=", 1)[0] for o in overrides]
        pending = [o for o, k in zip(overrides, keys) if known_keys is not None and k not in known_keys]
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
