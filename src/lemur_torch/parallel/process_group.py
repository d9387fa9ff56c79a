"""The job's CPU/GPU process group, joined the same way by both backends: the FSDP backend's ranks, the XLA
backend's hosts (which agree over it: stop signals, the resume choice, DCP's coordination)."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch.distributed as dist


def init_process_group(device_type: str, init_method: Optional[str] = None) -> None:
    """Join the job's process group, once: `init_method` where the platform has its own rendezvous (torch_xla's
    `xla://` on a TPU pod); else the environment's (torchrun/accelerate/srun set RANK and WORLD_SIZE); else a
    group of one rank. gloo on the CPU, plus nccl for CUDA tensors on GPUs. LEMUR_PG_TIMEOUT_S bounds how long a
    collective waits for a peer (default 30 min)."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=int(os.environ.get("LEMUR_PG_TIMEOUT_S", "1800")))
    if init_method is not None or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        dist.init_process_group(backend=backend, init_method=init_method, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
