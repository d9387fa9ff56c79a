"""The device table: what each accelerator kind can do, from its datasheet, plus the few measured efficiencies
the planner applies to it (one set per kind, never per run).

Peak dense bf16 FLOP/s come from lemur_torch.metrics.PEAK_FLOPS (the trainer's MFU denominator), looked up by
the name the device reports, so the plan's MFU and the trainer's are the same quantity. Bandwidths are in the
units their datasheets use: HBM in GB/s, links in Gbit/s per device and direction (what a ring collective
moves through one device; NVLink and ICI datasheets quote both directions together, halved here).

The efficiencies, each a property of the device kind and its kernel libraries, the same for every run:
- `mamf`: the Maximum Achievable Matmul FLOPS (the best bf16 GEMM over a sweep of shapes, torch.matmul, mean
  of 100 iterations after 50 warm-up ones) over the datasheet peak, from S. Bekman's ML Engineering book,
  compute/accelerator/README.md, "Maximum Achievable Matmul FLOPS comparison table": A100 SXM 86.9%, H100
  SXM 80.3% ("H200 is the same"), B200 SXM 77.6%; fp8: H100 70.9%, H200 73.4%, B200 76.3%. TPUs have no
  published MAMF: 0.9 is assumed (MaxText's 32B on v5e-256 executes 89% of peak over its whole step).
- `matmul_fraction` = mamf x TRAINING_GEMM_SHARE (0.85): a training step's GEMMs run below a best-shape burst
  (the backward's transposed layouts, the model's own shapes, clocks held at the power limit for hours). This
  one factor, for every kind, is the only number set against the published runs (tests/data/calibration.csv:
  the median predicted/published ratio of the GPU rows, 1.04 at 0.85); everything else comes from datasheets
  and papers.
- `attention_fraction`: FlashAttention-2 forward+backward, causal, head size 128, at 2k-8k tokens, in the
  paper's own FLOP count: ~170-190 TFLOP/s on A100 (T. Dao, "FlashAttention-2", 2023, fig. 5: 0.55), ~250-300
  on H100 (J. Shah et al., "FlashAttention-3", 2024, FA2 baseline: 0.27); Blackwell assumed as Hopper; TPUs
  (Pallas splash attention) assumed 0.5.
- `bandwidth_fraction`: the share of the HBM datasheet bandwidth eager elementwise kernels reach (0.7: casts,
  broadcasts and row reductions at bf16, 65-75% on A100/H100; large plain copies reach 85-90%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from lemur_torch.errors import ConfigError
from lemur_torch.metrics import peak_flops

TRAINING_GEMM_SHARE = 0.85


@dataclass(frozen=True)
class Device:
    kind: str
    reported_name: str  # what torch.cuda.get_device_name / PJRT's device_kind reports: keys metrics.PEAK_FLOPS
    memory_gib: float  # usable device memory
    hbm_gbs: float  # HBM bandwidth, GB/s
    intra_node_gbps: float  # NVLink (GPU) or ICI (TPU) per device and direction, Gbit/s
    inter_node_gbps: float  # network per device, Gbit/s (TPU: the ICI again: a slice is one torus)
    devices_per_node: int
    mamf: float
    attention_fraction: float
    fp8_mamf: Optional[float]  # None: no fp8 tensor cores (float8 not available)
    source: str
    tpu: bool = False
    bandwidth_fraction: float = 0.70
    peak_override: Optional[float] = None  # a part whose clocks differ from the datasheet's (power-capped)

    @property
    def peak_flops(self) -> float:
        value = self.peak_override or peak_flops("auto", self.reported_name)
        assert value, f"metrics.PEAK_FLOPS has no entry for {self.reported_name}"
        return value

    @property
    def matmul_fraction(self) -> float:
        return self.mamf * TRAINING_GEMM_SHARE

    @property
    def fp8_matmul_fraction(self) -> Optional[float]:
        return self.fp8_mamf * TRAINING_GEMM_SHARE if self.fp8_mamf else None


DEVICES: Dict[str, Device] = {
    d.kind: d
    for d in [
        Device(
            "a100_80gb",
            "NVIDIA A100-SXM4-80GB",
            79.2,
            2039.0,
            2400.0,  # NVLink 3: 600 GB/s both directions
            200.0,  # 8 x 200 Gb/s HDR InfiniBand per node (DGX A100)
            8,
            0.869,
            0.55,
            None,
            "NVIDIA A100 datasheet (80GB SXM: HBM2e 2,039 GB/s, NVLink 600 GB/s); DGX A100: 8 x 200 Gb/s HDR",
        ),
        Device(
            "h100_sxm",
            "NVIDIA H100 80GB HBM3",
            79.1,
            3350.0,
            3600.0,  # NVLink 4: 900 GB/s both directions
            400.0,  # 8 x 400 Gb/s NDR per node (DGX H100)
            8,
            0.803,
            0.27,
            0.709,
            "NVIDIA H100 datasheet (SXM: HBM3 3.35 TB/s, NVLink 900 GB/s); DGX H100: 8 x 400 Gb/s ConnectX-7",
        ),
        Device(
            "h100_pcie",
            "NVIDIA H100 PCIe",
            79.1,
            2000.0,
            512.0,  # no NVSwitch: rings run over PCIe Gen5 x16, 64 GB/s per direction
            400.0,
            8,
            0.803,  # the SXM part's MAMF; the PCIe part's lower clocks are in its peak already
            0.27,
            0.709,
            "NVIDIA H100 datasheet (PCIe: HBM2e 2.0 TB/s, PCIe Gen5 128 GB/s both directions)",
        ),
        Device(
            "h200",
            "NVIDIA H200",
            139.8,
            4800.0,
            3600.0,
            400.0,
            8,
            0.803,
            0.27,
            0.734,
            "NVIDIA H200 datasheet (SXM: 141 GB HBM3e, 4.8 TB/s, NVLink 900 GB/s)",
        ),
        Device(
            "b200",
            "NVIDIA B200",
            178.0,
            8000.0,
            7200.0,  # NVLink 5: 1.8 TB/s both directions
            400.0,
            8,
            0.776,
            0.27,
            0.763,
            "NVIDIA HGX B200 datasheet (180 GB HBM3e per GPU, 8 TB/s, NVLink 1.8 TB/s); 8 x 400 Gb/s per node",
        ),
        Device(
            "tpu_v4",
            "TPU v4",
            32.0,
            1200.0,
            2150.0,  # all-reduce bandwidth per pod 1.1 PB/s over 4096 chips = 269 GB/s per chip
            2150.0,
            4,
            0.90,
            0.50,
            None,
            "Cloud TPU v4 docs (32 GiB HBM2 at 1,200 GB/s; all-reduce bandwidth 1.1 PB/s per 4096-chip pod); "
            "4 chips per host",
            tpu=True,
        ),
        Device(
            "tpu_v5e",
            "TPU v5 lite",
            15.0,
            819.0,
            1600.0,  # ICI 400 GB/s both directions
            1600.0,
            8,
            0.90,
            0.50,
            None,
            "Cloud TPU v5e docs (16 GB HBM2 at 819 GB/s; ICI 400 GB/s bidirectional per chip; 8 chips per host)",
            tpu=True,
        ),
        Device(
            "tpu_v5p",
            "TPU v5p",
            95.0,
            2765.0,
            4800.0,  # ICI 1,200 GB/s both directions; the docs also quote 4,800 Gbps
            4800.0,
            4,
            0.90,
            0.50,
            None,
            "Cloud TPU v5p docs (95 GiB HBM2e at 2,765 GB/s; ICI 4,800 Gbps per chip; 4 chips per VM)",
            tpu=True,
        ),
        Device(
            "tpu_v6e",
            "TPU v6 lite",
            31.25,
            1640.0,
            3200.0,  # ICI 800 GB/s both directions
            3200.0,
            8,
            0.90,
            0.50,
            None,
            "Cloud TPU v6e docs (32 GB HBM at 1,640 GB/s; ICI 800 GB/s bidirectional per chip; 8 chips per host)",
            tpu=True,
        ),
    ]
}


# The device names the backends report (torch.cuda.get_device_name, the XLA backend's PJRT kind) -> the table's
# kind, matched in this order, case-insensitively, first match wins: parts the table does not hold (other memory
# sizes, NVL parts with other clocks) come first and map to None
REPORTED_KINDS = [
    (("H100 NVL", "H200 NVL", "A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB"), None),
    (("H100 PCIe",), "h100_pcie"),
    (("H100",), "h100_sxm"),
    (("H200",), "h200"),
    (("B200",), "b200"),
    (("A100",), "a100_80gb"),
    (("TPU v4",), "tpu_v4"),
    (("TPU v5 lite", "TPU v5e", "TPU v5litepod"), "tpu_v5e"),
    (("TPU v5p", "TPU v5"), "tpu_v5p"),
    (("TPU v6 lite", "TPU v6e", "TPU v6"), "tpu_v6e"),
]


def kind_of(device_name: str) -> Optional[str]:
    """The table's kind of a device as a backend names it; None for a CPU or a device the table does not hold."""
    name = device_name.lower()
    for names, kind in REPORTED_KINDS:
        if any(n.lower() in name for n in names):
            return kind
    return None


def get_device(kind: str) -> Device:
    if kind not in DEVICES:
        raise ConfigError("cluster.device", f"unknown device {kind!r}; one of {', '.join(DEVICES)}")
    return DEVICES[kind]
