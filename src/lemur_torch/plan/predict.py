"""One plan: memory and time of one setting on one cluster, and the figures a user reads (fits, step time,
tokens/s per device, MFU by the trainer's definition, days for the run, the bottleneck)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from lemur_torch.metrics import mfu
from lemur_torch.model import flops_per_token
from lemur_torch.plan import memory, timing
from lemur_torch.plan.cluster import Cluster
from lemur_torch.plan.memory import GIB, MemoryEstimate
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape, padded_shard
from lemur_torch.plan.sharding import real_sharding
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


def local_params(shape: ModelShape, s: Setting, cluster: Cluster, model_cfg: Optional[DictConfig] = None) -> int:
    """Parameters one device stores (the padded FSDP2 shard of the most loaded rank): from the real wrapping on
    a fake process group when the run's model group is given, else from the shape (the same rule)."""
    if not s.sharded:
        return shape.total_params
    group = s.shard_size(cluster.devices)
    if model_cfg is not None and s.backend == "fsdp":
        return int(real_sharding(model_cfg, group)["padded_local_params"])
    return padded_shard(shape.layer_tensors() * shape.layers + shape.root_tensors(), group)


def predict(
    shape: ModelShape,
    s: Setting,
    cluster: Cluster,
    max_steps: int = 1,
    model_cfg: Optional[DictConfig] = None,
    local: Optional[int] = None,
) -> Plan:
    local = local if local is not None else local_params(shape, s, cluster, model_cfg)
    mem = memory.estimate(shape, s, local, cuda_runtime=not cluster.device.tpu, devices=cluster.devices)
    time = timing.estimate(shape, s, cluster, local)
    fpt = flops_per_token(model_cfg, s.seq_len) if model_cfg is not None else shape.model_flops_per_token(s.seq_len)
    return Plan(shape, s, cluster, mem, time, max_steps, fpt)
