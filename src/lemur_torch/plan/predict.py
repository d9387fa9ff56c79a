"""One plan: memory and time of one setting on one cluster, and the figures a user reads (fits, step time,
tokens/s per device, MFU by the trainer's definition, days for the run, the bottleneck).

The state each device stores is the closed form of the backend's own sharding (`shape.padded_shard`: FSDP2's
dim-0 rows; `shape.spmd_shard`: the XLA backend's rule), which tests/test_plan.py checks against FSDP2's real
wrapping on a fake process group (lemur_torch/plan/sharding.py): no model is built to plan a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from lemur_torch.metrics import mfu
from lemur_torch.plan import memory, timing
from lemur_torch.plan.cluster import Cluster
from lemur_torch.plan.memory import GIB, MemoryEstimate
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape, padded_shard, spmd_shard
from lemur_torch.plan.timing import TimeEstimate


@dataclass
class Plan:
    shape: ModelShape
    setting: Setting
    cluster: Cluster
    memory: MemoryEstimate
    time: TimeEstimate
    max_steps: int
    model_flops_per_token: float

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.cluster.memory_gib * GIB

    @property
    def step_time_s(self) -> float:
        return self.time.step_s

    @property
    def tokens_per_s_per_device(self) -> float:
        s = self.setting
        return s.tokens_per_micro_batch * s.grad_accum / self.step_time_s

    @property
    def mfu(self) -> Optional[float]:
        n = self.cluster.devices
        return mfu(self.tokens_per_s_per_device * n, self.model_flops_per_token, self.cluster.device.peak_flops, n)

    @property
    def days(self) -> float:
        return self.max_steps * self.step_time_s / 86400

    @property
    def bottleneck(self) -> str:
        return self.time.bottleneck if self.fits else "memory"

    def to_json(self) -> Dict[str, Any]:
        c = self.cluster
        return {
            "fits": self.fits,
            "peak_memory_gib": round(self.memory.peak / GIB, 2),
            "device_memory_gib": c.memory_gib,
            "peak_moment": self.memory.moment,
            "memory_gib": self.memory.gib(),
            "step_time_s": round(self.step_time_s, 3),
            "time_s": {k: round(v, 3) for k, v in self.time.parts.items()},
            "tokens_per_s_per_device": round(self.tokens_per_s_per_device, 1),
            "mfu": round(self.mfu, 4) if self.mfu is not None else None,
            "days": round(self.days, 2),
            "max_steps": self.max_steps,
            "bottleneck": self.bottleneck,
            "setting": self.setting.describe(),
            "cluster": {
                "device": c.device.kind,
                "devices": c.devices,
                "devices_per_node": c.devices_per_node,
                "inter_node_gbps": c.inter_node_gbps,
                "intra_node_gbps": c.intra_node_gbps,
            },
        }


def local_params(shape: ModelShape, s: Setting, cluster: Cluster) -> int:
    """Parameters one device stores: the padded shard of the most loaded rank under the backend's sharding."""
    if not s.sharded:
        return shape.total_params
    if s.backend == "xla_spmd":
        return spmd_shard(shape.all_shapes(), cluster.devices // s.tensor, s.tensor)
    return padded_shard(shape.layer_tensors() * shape.layers + shape.root_tensors(), s.shard_size(cluster.devices))


def predict(shape: ModelShape, s: Setting, cluster: Cluster, max_steps: int = 1, local: Optional[int] = None) -> Plan:
    local = local if local is not None else local_params(shape, s, cluster)
    mem = memory.estimate(shape, s, local, cuda_runtime=not cluster.device.tpu, devices=cluster.devices)
    time = timing.estimate(shape, s, cluster, local)
    return Plan(shape, s, cluster, mem, time, max_steps, shape.model_flops_per_token(s.seq_len))
