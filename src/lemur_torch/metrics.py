"""Step metrics: FLOPs/token, MFU, tokens/s, memory; sinks: rich console, wandb, and metrics.jsonl."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

# Dense bf16 peak FLOP/s per device (no sparsity), matched by substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is 756e12: set log.peak_flops explicitly for it
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPUv4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5e": 197e12,
    "TPU v5 lite": 197e12,  # PJRT's name for v5e
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops(setting: str, device_kind: str) -> Optional[float]:
    """FLOP/s per device: a number from the config, or looked up by device name; None where unknown (CPU)."""
    if setting != "auto":
        return float(setting)
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], num_devices: int) -> Optional[float]:
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


class Progress:
    """Where the run is in time: elapsed since the loop started, the recent rate in steps/s (over the last
    `window` logged steps, so the first step's warm-up and compile fall out of it) and the ETA to max_steps."""

    def __init__(self, max_steps: int, start_step: int, window: int = 20):
        self.max_steps = max_steps
        self.t0 = time.perf_counter()
        self.marks: Deque[Tuple[int, float]] = deque([(start_step, self.t0)], maxlen=window + 1)

    def update(self, step: int) -> Dict[str, Optional[float]]:
        now = time.perf_counter()
        self.marks.append((step, now))
        first_step, first_time = self.marks[0]
        rate = (step - first_step) / (now - first_time) if step > first_step and now > first_time else None
        eta = max(self.max_steps - step, 0) / rate if rate else None
        return {"elapsed_s": now - self.t0, "steps_per_s": rate, "eta_s": eta}


class MetricsLogger:
    """Rank 0 writes every step to the console (rich), wandb and run_dir/metrics.jsonl; other ranks do nothing."""

    def __init__(self, cfg: DictConfig, enabled: bool):
        self.enabled = enabled
        self.cfg = cfg
        self.console = None
        self.wandb_run = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.run_dir, "metrics.jsonl"), "a", buffering=1)
        if cfg.log.console:
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)
        if cfg.log.wandb_mode != "disabled":
            self._init_wandb(cfg)

    def _init_wandb(self, cfg: DictConfig) -> None:
        import wandb

        id_file = os.path.join(cfg.run_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else uuid.uuid4().hex[:12]
        with open(id_file, "w") as f:
            f.write(run_id)
        os.makedirs(cfg.log.wandb_dir, exist_ok=True)
        # a resumed job continues the same wandb run
        self.wandb_run = wandb.init(
            project=cfg.log.wandb_project, name=cfg.run_name, id=run_id, resume="allow", mode=cfg.log.wandb_mode,
            dir=cfg.log.wandb_dir, config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.console is not None:
            self.console.print(message, markup=False)
        else:
            print(message, flush=True)

    def log_step(self, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=metrics["step"])
        if self.console is not None:
            self.console.print(_format(metrics))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _format(m: Dict[str, Any]) -> str:
    parts = [f"[bold]step {m['step']}[/bold]", f"loss {m['loss']:.4f}"]
    parts += [f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("loss/") and v is not None]
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:,.0f}"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    for key in ("mem_alloc_gib", "rss_peak_gib"):
        if key in m:
            parts.append(f"mem {m[key]:.2f}GiB")
    if m.get("elapsed_s") is not None:
        parts.append(f"elapsed {duration(m['elapsed_s'])}")
    if m.get("steps_per_s") is not None:
        parts.append(f"{m['steps_per_s']:.2f} steps/s")
        parts.append(f"eta {duration(m['eta_s'])}")
    if m.get("skipped_steps"):
        parts.append(f"[red]skipped {m['skipped_steps']}[/red]")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """45s, 3m05s, 2h03m, 3d04h: two units at most, to read at a glance."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
