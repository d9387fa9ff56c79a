"""The planner against published runs of FSDP-style training (tests/data/calibration.csv): one set of constants
per device kind (lemur_torch/plan/devices.py), every row's own configuration, no per-row tuning.

Each row names its source and how its model maps to a ModelShape; MFU figures were converted to tokens/s per
device with the source's own FLOP count (see the row's `published` and `notes`).
"""

import csv
import dataclasses
import os

import pytest

from lemur_torch.plan.cluster import Cluster
from lemur_torch.plan.devices import get_device
from lemur_torch.plan.predict import Plan, predict
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape

TABLE = os.path.join(os.path.dirname(__file__), "data", "calibration.csv")
GIB = 2**30


def load_rows():
    with open(TABLE, newline="") as f:
        return list(csv.DictReader(f))


def plan_row(row) -> Plan:
    device = get_device(row["device"])
    if row["hbm_gbs"]:  # the row's hardware differs from the kind's datasheet (e.g. H100 96GB HBM2e at 500 W)
        device = dataclasses.replace(device, hbm_gbs=float(row["hbm_gbs"]))
    if row["peak_tflops"]:
        device = dataclasses.replace(device, peak_override=float(row["peak_tflops"]) * 1e12)
    per_node = int(row["devices_per_node"])
    cluster = Cluster(
        device=device,
        devices=int(row["devices"]),
        devices_per_node=per_node,
        inter_node_gbps=float(row["inter_node_gbps"] or device.inter_node_gbps),
        intra_node_gbps=device.intra_node_gbps,
        memory_gib=float(row["memory_gib"] or device.memory_gib),
    )
    shape = ModelShape(
        layers=int(row["layers"]),
        hidden=int(row["hidden"]),
        heads=int(row["heads"]),
        kv_heads=int(row["kv_heads"]),
        ffn=int(row["ffn"]),
        ffn_matrices=int(row["ffn_matrices"]),
        vocab=int(row["vocab"]),
        tied_embeddings=row["tied"] == "1",
        head_dim=int(row["head_dim"]),
        extra_params=int(row["extra_params"]),
        name=row["model"],
    )
    setting = Setting(
        seq_len=int(row["seq_len"]),
        micro_batch=int(row["micro_batch"]),
        grad_accum=int(row["grad_accum"]),
        backend=row["backend"],
        ac=row["ac"],
        ac_every_n=int(row["ac_every_n"]),
        param_dtype=row["compute_dtype"],
        reduce_dtype=row["reduce_dtype"],
        reshard_last=row["reshard_last"] == "1",
        compile=row["compile"] == "1",
        float8=row["float8"] == "1",
        loss=row["loss"],
        fused_norm=row["fused_norm"] == "1",
    )
    return predict(shape, setting, cluster)


def test_calibration_table_is_complete():
    rows = load_rows()
    assert len(rows) >= 10
    kinds = {r["device"] for r in rows}
    assert len({k for k in kinds if not k.startswith("tpu")}) >= 2 and any(k.startswith("tpu") for k in kinds)
    for r in rows:
        assert r["source"] and r["published"] and float(r["tokens_per_s_per_device"]) > 0, r["id"]


def test_predictions_match_published_runs():
    rows = load_rows()
    lines, within, memory_misses = [], 0, []
    for r in rows:
        plan = plan_row(r)
        ratio = plan.tokens_per_s_per_device / float(r["tokens_per_s_per_device"])
        within += abs(ratio - 1) <= 0.20
        mem = ""
        if r["memory_reserved_gib"]:
            published = float(r["memory_reserved_gib"])
            mem_ratio = plan.memory.reserved / GIB / published
            mem = f"  memory {plan.memory.reserved / GIB:6.1f} / {published:6.1f} GiB = {mem_ratio:.2f}"
            if abs(mem_ratio - 1) > 0.15:
                memory_misses.append(r["id"])
        lines.append(
            f"{r['id']:30s} {plan.tokens_per_s_per_device:9.0f} / {float(r['tokens_per_s_per_device']):7.0f} tok/s"
            f" = {ratio:.2f}{mem}"
        )
    print("\npredicted / published tokens/s per device")
    print("\n".join(lines))
    print(f"{within} of {len(rows)} rows within +-20%")
    assert within >= 0.8 * len(rows)
    assert not memory_misses, f"peak memory off by more than 15%: {memory_misses}"


@pytest.mark.parametrize("kind", ["a100_80gb", "h100_sxm", "tpu_v5e"])
def test_one_set_of_constants_per_device_kind(kind):
    """Every row of a kind is predicted with the same rates: a row may state only its hardware's own datasheet
    differences (HBM bandwidth, a power-capped peak), never an efficiency."""
    rows = [r for r in load_rows() if r["device"] == kind]
    devices = {dataclasses.replace(plan_row(r).cluster.device, hbm_gbs=0, peak_override=None) for r in rows}
    assert len(devices) == 1
