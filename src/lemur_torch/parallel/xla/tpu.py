"""What PJRT runs on: the device type ("TPU", "CPU", ...) and, on TPU, the chip's name as PJRT spells it,
which is the key of lemur_torch.metrics.PEAK_FLOPS for MFU.

The gate imports this module (through rules.py) on machines that may have no torch_xla: torch_xla is imported
inside the functions, only where it is installed.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

# TPU VM accelerator types (the part before "-<chips>") -> PJRT's device kind, the key of metrics.PEAK_FLOPS
TPU_KINDS = {"v4": "TPU v4", "v5litepod": "TPU v5 lite", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def runtime_device_type() -> Optional[str]:
    """PJRT's device type as the XLA backend will see it (from PJRT_DEVICE, or what torch_xla detects), or None
    where torch_xla is not installed."""
    if importlib.util.find_spec("torch_xla") is None:
        return None
    import torch_xla.runtime as xr  # optional: only the XLA environment has it

    return xr.device_type()


def pjrt_device_kind(device_type: str) -> str:
    """PJRT's own name for the chip, looked up in metrics.PEAK_FLOPS for MFU: "TPU v4", "TPU v5 lite" (v5e),
    "TPU v5" (v5p), "TPU v6 lite" (v6e). torch_xla cannot ask PJRT under SPMD (the virtual SPMD device has
    no kind, and asking a real device before use_spmd() leaves the SPMD runtime crashing at the first
    step), so on TPU it comes from the VM's accelerator type in the TPU metadata (e.g. v5litepod-256)."""
    if device_type != "TPU":
        return (device_type or "unknown").lower()
    from torch_xla._internal import tpu  # optional: only the XLA environment has it

    try:
        accelerator = tpu.get_tpu_type()
    except Exception:  # noqa: BLE001  (no metadata server: MFU needs log.peak_flops then)
        return "TPU"
    return TPU_KINDS.get(accelerator, f"TPU {accelerator}")
