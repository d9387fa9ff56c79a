"""The cluster a plan is for: the run config's `cluster` group (lemur_torch.config.schema.ClusterConfig, composed
and bound-checked with the rest of the config) resolved against the device table's defaults.

`lemur-plan` needs `cluster.device` and `cluster.devices`; the start-of-run prediction takes the device kind and
the device count the backend found, and the rest of the group (links, devices per node, memory) as it is. A bad
combination is one ConfigError naming its key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig

from lemur_torch.errors import ConfigError
from lemur_torch.plan.devices import DEVICES, Device, get_device


@dataclass(frozen=True)
class Cluster:
    """A resolved cluster: the device kind and the numbers the plan uses."""

    device: Device
    devices: int
    devices_per_node: int
    inter_node_gbps: float
    intra_node_gbps: float
    memory_gib: float

    @property
    def nodes(self) -> int:
        return math.ceil(self.devices / self.devices_per_node)


def resolve(c: DictConfig, device_kind: Optional[str] = None, devices: Optional[int] = None) -> Cluster:
    """The `cluster` group (composed and bound-checked) as a Cluster. `device_kind` and `devices`, where given,
    replace `cluster.device` and `cluster.devices` (a running backend's own device and count)."""
    kind = device_kind or (str(c.device) if c.device is not None else None)
    if kind is None:
        raise ConfigError("cluster.device", f"name the device kind to plan for, one of {', '.join(DEVICES)}")
    count = devices or c.devices
    if count is None:
        raise ConfigError("cluster.devices", "give the number of accelerators (GPUs or TPU chips) the run uses")
    device = get_device(kind)
    per_node = c.devices_per_node or device.devices_per_node
    if count > per_node and count % per_node:
        raise ConfigError(
            "cluster.devices_per_node",
            f"{count} devices do not fill nodes of {per_node}; give a multiple of {per_node} devices or set "
            "cluster.devices_per_node",
        )
    return Cluster(
        device=device,
        devices=int(count),
        devices_per_node=min(per_node, int(count)),
        inter_node_gbps=float(c.inter_node_gbps or device.inter_node_gbps),
        intra_node_gbps=float(c.intra_node_gbps or device.intra_node_gbps),
        memory_gib=float(c.memory_gib or device.memory_gib),
    )
