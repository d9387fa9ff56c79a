"""Step metrics: FLOPs/token, MFU, tokens/s, memory; sinks: rich console, wandb, and metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) bf16 peak FLOP/s per device, with the datasheet each figure comes from; datasheets
# quote sparse figures first: the dense one is half. Matched against the device name (torch.cuda's
# get_device_name, PJRT's device_kind) in this order, case-insensitively, first match wins, so a specific
# part ("H100 PCIe") comes before its family ("H100") and "TPU v5 lite" before "TPU v5".
PEAK_FLOPS: List[Tuple[Tuple[str, ...], float, str]] = [
    (("H100 PCIe",), 756e12, "NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity"),
    (
        ("H100 NVL", "H200 NVL"),
        835e12,
        "NVIDIA H100 datasheet: H100 NVL BF16 1,671 TFLOPS with sparsity; NVIDIA H200 datasheet: H200 NVL the same",
    ),
    (
        ("H100", "H200", "H800", "GH200"),
        989e12,
        "NVIDIA H100 datasheet (SXM, 'NVIDIA H100 80GB HBM3') and H200 datasheet (SXM): BF16 1,979 TFLOPS with "
        "sparsity",
    ),
    (("B200",), 2250e12, "NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity"),
    (("A100",), 312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense, 40GB and 80GB, SXM and PCIe"),
    (("TPU v4",), 275e12, "Google Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip"),
    (
        ("TPU v5 lite", "TPU v5e", "TPU v5litepod"),
        197e12,
        "Google Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip",
    ),
    (("TPU v5p", "TPU v5"), 459e12, "Google Cloud TPU v5p documentation: 459 TFLOPS bf16 per chip (PJRT: 'TPU v5')"),
    (
        ("TPU v6 lite", "TPU v6e", "TPU v6"),
        918e12,
        "Google Cloud TPU v6e (Trillium) documentation: 918 TFLOPS bf16 per chip",
    ),
]
_unknown_logged: set = set()


def peak_flops(setting: str, device_kind: str) -> Optional[float]:
    """FLOP/s per device: a number from the config, or looked up by device name; None where unknown, which
    is logged once for an accelerator (MFU is then left out of the metrics; a CPU run has none to report)."""
    if setting != "auto":
        return float(setting)
    kind = device_kind.lower()
    if kind == "cpu":
        return None
    for names, value, _source in PEAK_FLOPS:
        if any(name.lower() in kind for name in names):
            return value
    if device_kind not in _unknown_logged:
        _unknown_logged.add(device_kind)
        log.warning(
            "MFU unavailable: no peak FLOP/s known for device %r (metrics.PEAK_FLOPS); set "
            "log.peak_flops=<dense bf16 FLOP/s per device>, e.g. log.peak_flops=989e12",
            device_kind,
        )
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
            self.console = Console(highlight=False, soft_wrap=True)

    def start_run(self, run_id: str) -> None:
        """Open the wandb run of this lineage (the run id lemur_torch.checkpoint carries from checkpoint to
        checkpoint): a resumed run continues its wandb run, a fresh start in the same folder gets a new one."""
        if not self.enabled or self.cfg.log.wandb_mode == "disabled" or self.wandb_run is not None:
            return
        import wandb  # a second or more to import: only runs that log to wandb pay for it

        cfg = self.cfg
        os.makedirs(cfg.log.wandb_dir, exist_ok=True)
        self.wandb_run = wandb.init(
            project=cfg.log.wandb_project,
            name=cfg.run_name,
            id=run_id,
            resume="allow",
            mode=cfg.log.wandb_mode,
            dir=cfg.log.wandb_dir,
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.console is not None:
            self.console.print(message, markup=False)
        else:
            print(message, flush=True)

    def log_step(self, metrics: Dict[str, Any]) -> None:
        self._emit(metrics, _format)

    def log_validation(self, metrics: Dict[str, Any]) -> None:
        """A validation record: its own line in metrics.jsonl ({"step": N, "val/...": ...}), the same wandb step."""
        self._emit(metrics, _format_validation)

    def _emit(self, metrics: Dict[str, Any], console_line) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in metrics.items() if v is not None and k != "step"}, step=metrics["step"]
            )
        if self.console is not None:
            self.console.print(console_line(metrics))

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


def _format_validation(m: Dict[str, Any]) -> str:
    def val(key):
        return "n/a" if m.get(key) is None else f"{m[key]:.4f}"

    ppl = "n/a" if m.get("val/ppl") is None else f"{m['val/ppl']:.2f}"
    parts = [f"[bold]validation at step {m['step']}[/bold]", f"loss {val('val/loss')}", f"ppl {ppl}"]
    parts += [f"{k[9:]} {val(k)}" for k in m if k.startswith("val/loss/")]
    parts.append(f"{m['val/tokens']:,.0f} tokens in {m['val/time_s']:.1f}s")
    return "  ".join(parts)


def _format(m: Dict[str, Any]) -> str:
    parts = [f"[bold]step {m['step']}[/bold]", f"loss {m['loss']:.4f}"]
    parts += [f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("loss/") and v is not None]
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"tok/s {m['tokens_per_s']:,.0f}"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if m.get("step_time_vs_predicted") is not None:
        parts.append(f"time/plan {m['step_time_vs_predicted']:.2f}")
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
