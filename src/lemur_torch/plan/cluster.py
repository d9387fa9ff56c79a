"""The cluster a plan is for: `cluster.*` command-line settings, their bounds, and the device table's defaults.

`lemur-plan` takes the run's own Hydra overrides plus `cluster.device=...`, `cluster.devices=...` and the
optional link and memory settings; `split_cluster_overrides` takes the latter off the command line before the
rest is composed with the run's config. A bad value is one ConfigError naming its key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from lemur_torch.errors import ConfigError
from lemur_torch.fields import bounded, check_bounds
from lemur_torch.plan.devices import DEVICES, Device, get_device


@dataclass
class ClusterConfig:
    # one of lemur_torch.plan.devices.DEVICES
    device: str = "h100_sxm"
    devices: int = bounded(8, ge=1, hint="the number of accelerators (GPUs or TPU chips) the run uses")
    # null: the device kind's default (8 GPUs per node, 4 or 8 TPU chips per host)
    devices_per_node: Optional[int] = bounded(None, ge=1)
    # network per device, Gbit/s (TPU: ICI per chip); null: the device kind's default
    inter_node_gbps: Optional[float] = bounded(None, gt=0, hint="Gbit/s per device, e.g. 400 for 8 x 400G NICs")
    # NVLink per device and direction, Gbit/s (TPU: ICI); null: the device kind's default
    intra_node_gbps: Optional[float] = bounded(None, gt=0)
    # usable memory per device, GiB; null: the device kind's
    memory_gib: Optional[float] = bounded(None, gt=0)


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


def resolve(c: ClusterConfig) -> Cluster:
    check_bounds(dataclasses.asdict(c), ClusterConfig, "cluster", ConfigError)
    device = get_device(c.device)
    per_node = c.devices_per_node or device.devices_per_node
    if c.devices > per_node and c.devices % per_node:
        raise ConfigError(
            "cluster.devices_per_node",
            f"{c.devices} devices do not fill nodes of {per_node}; give a multiple of {per_node} devices or set "
            "cluster.devices_per_node",
        )
    return Cluster(
        device=device,
        devices=c.devices,
        devices_per_node=min(per_node, c.devices),
        inter_node_gbps=float(c.inter_node_gbps or device.inter_node_gbps),
        intra_node_gbps=float(c.intra_node_gbps or device.intra_node_gbps),
        memory_gib=float(c.memory_gib or device.memory_gib),
    )


_TYPES = {f.name: f.type for f in dataclasses.fields(ClusterConfig)}


def _parse(key: str, text: str):
    kind = _TYPES[key]
    if key == "device":
        if text not in DEVICES:
            raise ConfigError("cluster.device", f"unknown device {text!r}; one of {', '.join(DEVICES)}")
        return text
    if text.lower() in ("null", "none") and "Optional" in str(kind):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"cluster.{key}", f"{text!r} is not a number") from None
    if "int" in str(kind):
        if not value.is_integer():
            raise ConfigError(f"cluster.{key}", f"{text!r} is not a whole number")
        return int(value)
    return value


def split_cluster_overrides(args: List[str]) -> Tuple[Cluster, List[str]]:
    """`cluster.key=value` arguments parsed into a Cluster; the other arguments returned as they are."""
    values: Dict[str, object] = {}
    rest = []
    for arg in args:
        key, sep, text = arg.lstrip("+").partition("=")
        if not key.startswith("cluster."):
            rest.append(arg)
            continue
        name = key[len("cluster.") :]
        if name not in _TYPES:
            raise ConfigError(
                key, f"no such cluster setting; the settings are {', '.join('cluster.' + k for k in _TYPES)}"
            )
        if not sep or not text:
            raise ConfigError(key, f"needs a value: {key}=<value>")
        values[name] = _parse(name, text.strip())
    return resolve(ClusterConfig(**values)), rest
