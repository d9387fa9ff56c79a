"""The plan of a run's own configuration: its composed config (model, train, parallel, cluster) to a Plan, for
`lemur-plan` and for the start-of-run prediction (`predict_run`: on the device kind and count the backend found).
"""

from __future__ import annotations

from typing import Optional, Tuple

from omegaconf import DictConfig

from lemur_torch.errors import ConfigError, InputError
from lemur_torch.plan.cluster import Cluster, resolve
from lemur_torch.plan.devices import kind_of
from lemur_torch.plan.memory import GIB
from lemur_torch.plan.predict import Plan, predict
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape


def shape_of(cfg: DictConfig) -> ModelShape:
    return ModelShape.from_model_config(cfg.model)


def setting_of(cfg: DictConfig, cluster: Cluster) -> Setting:
    """The run's settings on `cluster`; a TPU plans the XLA backend, a GPU the FSDP one."""
    tpu = cluster.device.tpu
    if tpu and cfg.parallel.backend != "xla_spmd":
        raise ConfigError("cluster.device", f"{cluster.device.kind} is a TPU: plan it with parallel=xla_spmd")
    if not tpu and cfg.parallel.backend == "xla_spmd":
        raise ConfigError("cluster.device", f"parallel=xla_spmd runs on TPUs; {cluster.device.kind} is a GPU")
    s = Setting.from_config(cfg, cluster)
    # sdpa on an accelerator keeps its [B, 1, S, S] document mask and expands K/V; every other kernel does not
    return s.replace(attention="sdpa" if cfg.model.attention == "sdpa" else "flash")


def plan_run(cfg: DictConfig, cluster: Cluster) -> Plan:
    return predict(shape_of(cfg), setting_of(cfg, cluster), cluster, int(cfg.train.max_steps))


def predict_run(cfg: DictConfig, device_name: str, devices: int) -> Tuple[Optional[Plan], str]:
    """The plan of this run on the devices its backend found (`device_name` as the backend reports it), and one
    line saying what it predicts, or why there is no prediction (a CPU, a device the table does not hold, a
    setting the planner does not model)."""
    kind = kind_of(device_name)
    if kind is None:
        where = "" if device_name.lower() == "cpu" else " (not in lemur_torch/plan/devices.py)"
        return None, f"no prediction for {device_name}{where}"
    try:
        plan = plan_run(cfg, resolve(cfg.cluster, kind, devices))
    except InputError as exc:
        return None, f"no prediction ({exc.one_line()})"
    return plan, describe_prediction(plan)


def describe_prediction(plan: Plan) -> str:
    c, m = plan.cluster, plan.memory
    mfu = f", MFU {100 * plan.mfu:.1f}%" if plan.mfu is not None else ""
    fits = "fits" if plan.fits else "DOES NOT FIT"
    return (
        f"{plan.step_time_s:.2f} s/step, {plan.tokens_per_s_per_device:,.0f} tokens/s per device{mfu}, peak "
        f"{m.peak / GIB:.1f} GiB of {c.memory_gib:g} ({fits}), {plan.days:.2f} days for {plan.max_steps:,} steps, "
        f"bottleneck {plan.bottleneck} (lemur-plan on {c.devices} x {c.device.kind})"
    )
