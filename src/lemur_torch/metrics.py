"""Step metrics: FLOPs/token, MFU, tokens/s, memory; sinks: rich console, wandb, and metrics.jsonl."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

# Dense bf16 peak FLOP/s per device (no sparsity), matched by substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe part is 756e12: set log.peak_flops explicitly for it
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPUv4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # PJRT's name for v5p
    "TPU v5e": 197e12,
    "TPU v5 lite": 197e12,  # PJRT's name for v5e
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops(setting: str, device_kind: str) -> Optional[float]:
    """FLOP/s per device: a number from the config, or looked up by device name; None where unknown (CPU)."""
    if setting != "auto":
        return float(setting)
    exact = {key.lower(): value for key, value in PEAK_FLOPS.items()}
    if device_kind.lower() in exact:  # PJRT's "TPU v5" (v5p) is also a substring of "TPU v5 lite" (v5e)
        return exact[device_kind.lower()]
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], num_devices: int) -> Optional[float]:
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


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
            dir=cfg.log.wandb_dir, config=OmegaConf.to_container(cfg, resolve=True),
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
    if m.get("skipped_steps"):
        parts.append(f"[red]skipped {m['skipped_steps']}[/red]")
    return "  ".join(parts)
