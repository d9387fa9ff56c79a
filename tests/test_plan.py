"""lemur-plan: the real FSDP2 sharding at 512 ranks, the CLI, and the model's physics checked against its own
references (the trainer's FLOP and parameter counts, orderings every plan must respect)."""

import json
import subprocess
import sys

import pytest

from lemur_torch.config import load_config
from lemur_torch.model import count_params, flops_per_token
from lemur_torch.plan import cli
from lemur_torch.plan.cluster import ClusterConfig, resolve, split_cluster_overrides
from lemur_torch.plan.memory import GIB
from lemur_torch.plan.predict import predict
from lemur_torch.plan.search import search
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape, padded_shard

PRETRAIN = ["experiment=lemur_70b_pretrain"]


@pytest.mark.slow
def test_llama2_70b_shards_over_512_ranks():
    # its own process: the fake process group is process-global
    proc = subprocess.run(
        [sys.executable, "-m", "lemur_torch.plan", "--world-size", "512", "model=llama2_70b"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    total = count_params(load_config(["model=llama2_70b"]).model)
    assert report["total_params"] == total == 68_976_648_192
    # FSDP2 shards every parameter on dim 0 (padded): each rank holds total/512 up to one row per tensor
    cfg = load_config(["model=llama2_70b"]).model
    max_rounding = (cfg.num_hidden_layers * 9 + 3) * max(cfg.hidden_size, cfg.intermediate_size)
    assert abs(report["local_params"] - total / 512) <= max_rounding
    assert 1.9 < report["state_gib_per_rank"] < 2.1  # docs/recipe.md, Scale: ~2.2 GB = 2.0 GiB of state per rank
    # the plan's state part: the shape's padded shard is the real wrapping's
    shape = ModelShape.from_model_config(cfg)
    assert (
        padded_shard(shape.layer_tensors() * shape.layers + shape.root_tensors(), 512) == report["padded_local_params"]
    )


@pytest.mark.parametrize("model", ["tiny", "llama2_7b", "llama2_13b", "llama2_70b"])
def test_shape_counts_agree_with_the_trainer(model):
    m = load_config([f"model={model}"]).model
    shape = ModelShape.from_model_config(m)
    assert shape.total_params == count_params(m)
    for seq in (256, 4096):
        assert shape.model_flops_per_token(seq) == pytest.approx(flops_per_token(m, seq))


@pytest.mark.slow
def test_plan_json_for_the_shipped_70b_config_on_512_h100():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lemur_torch.plan",
            "--json",
            *PRETRAIN,
            "cluster.device=h100_sxm",
            "cluster.devices=512",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    for key in ("fits", "peak_memory_gib", "memory_gib", "step_time_s", "tokens_per_s_per_device", "mfu", "days"):
        assert key in plan
    assert plan["bottleneck"] in ("compute", "communication", "host", "memory")
    assert plan["fits"] and 0 < plan["peak_memory_gib"] < 79.1
    assert plan["peak_memory_gib"] == pytest.approx(sum(plan["memory_gib"].values()), abs=0.1)
    # fp32 params, grads and both moments: 16 bytes per parameter of the 512th share
    state = plan["memory_gib"]["params"] + plan["memory_gib"]["optimizer"]
    assert state == pytest.approx(12 * 68_976_648_192 / 512 / GIB, rel=0.01)
    # tokens/s and MFU by the trainer's formula; days = max_steps x step time
    assert plan["tokens_per_s_per_device"] == pytest.approx(2 * 4096 / plan["step_time_s"], rel=0.01)
    assert plan["mfu"] == pytest.approx(plan["tokens_per_s_per_device"] * 4.46e11 / 989e12, rel=0.01)
    assert plan["days"] == pytest.approx(21458 * plan["step_time_s"] / 86400, rel=0.01)


@pytest.mark.parametrize(
    "arg, key",
    [
        ("cluster.devices=0", "cluster.devices"),
        ("cluster.device=tpu_v9", "cluster.device"),
        ("cluster.inter_node_gbps=-5", "cluster.inter_node_gbps"),
        ("cluster.devices=abc", "cluster.devices"),
        ("cluster.memory=80", "cluster.memory"),
        ("cluster.devices=12", "cluster.devices_per_node"),
    ],
)
def test_bad_cluster_settings_are_one_line_errors(arg, key, capsys):
    assert cli.main([*PRETRAIN, arg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err


def test_a_tpu_needs_the_xla_backend(capsys):
    assert cli.main([*PRETRAIN, "cluster.device=tpu_v4", "cluster.devices=256"]) == 2
    assert "'cluster.device'" in capsys.readouterr().err


def h100(devices, **kw):
    return resolve(ClusterConfig(device="h100_sxm", devices=devices, **kw))


def shipped(devices, **changes):
    cfg = load_config(PRETRAIN)
    cluster = h100(devices)
    return ModelShape.from_model_config(cfg.model), Setting.from_config(cfg, cluster).replace(**changes), cluster


def test_checkpointing_trades_memory_for_time():
    plans = {ac: predict(*shipped(512, ac=ac)) for ac in ("none", "every_n", "selective", "full")}
    mem = {ac: p.memory.components.get("activations", 0) for ac, p in plans.items()}
    assert mem["none"] > mem["every_n"] > mem["selective"] > mem["full"]
    assert not plans["none"].fits and plans["full"].fits
    assert plans["full"].step_time_s > plans["selective"].step_time_s


def test_more_devices_at_a_fixed_batch_never_raise_mfu():
    cfg = load_config(PRETRAIN)
    shape = ModelShape.from_model_config(cfg.model)
    mfus = []
    for n in (64, 128, 256, 512):
        cluster = h100(n)
        mfus.append(predict(shape, Setting.from_config(cfg, cluster), cluster).mfu)
    assert all(a >= b * 0.999 for a, b in zip(mfus, mfus[1:]))


def test_a_slow_network_is_a_communication_bottleneck_that_hsdp_relieves():
    shape, s, _ = shipped(512, micro_batch=1, grad_accum=2)
    slow = h100(512, inter_node_gbps=25)
    fsdp = predict(shape, s, slow)
    hsdp = predict(shape, s.replace(dp_replicate=64), slow)
    assert fsdp.bottleneck == "communication"
    assert hsdp.time.parts["exposed_communication"] < fsdp.time.parts["exposed_communication"]


def test_float8_speeds_up_compute_bound_steps_and_halves_the_gathers():
    shape, s, cluster = shipped(512, compile=True)
    bf16, fp8 = predict(shape, s, cluster), predict(shape, s.replace(float8=True), cluster)
    assert fp8.step_time_s < bf16.step_time_s
    # per layer: two all-gathers (forward, backward) of 2 -> ~1 bytes per parameter, one fp32 reduce-scatter
    expected = (2 * 1 + 4) / (2 * 2 + 4)
    assert fp8.time.parts["communication_total"] / bf16.time.parts["communication_total"] == pytest.approx(
        expected, rel=0.03
    )


def test_the_recipe_batch_has_no_split_below_one_sequence_per_device():
    cfg = load_config(PRETRAIN)
    with pytest.raises(Exception) as info:
        Setting.from_config(cfg, h100(2048))
    assert getattr(info.value, "key", "") == "train.global_batch_tokens"


def test_search_ranks_fitting_settings_of_the_global_batch():
    cfg = load_config(PRETRAIN)
    shape, s, cluster = shipped(256)
    found = search(shape, s, cluster, cfg.train.global_batch_tokens, cfg.train.max_steps)
    assert found and all(c.plan.fits for c in found)
    for c in found:
        p = c.plan.setting
        assert p.micro_batch * p.grad_accum * p.seq_len * cluster.devices == cfg.train.global_batch_tokens
    times = [c.plan.step_time_s for c in found]
    assert times[0] <= min(times) * 1.01
    assert times[0] <= predict(shape, s, cluster).step_time_s


def test_split_cluster_overrides_leaves_the_run_overrides():
    cluster, rest = split_cluster_overrides(["cluster.device=tpu_v5p", "cluster.devices=64", "train.seq_len=2048"])
    assert cluster.device.kind == "tpu_v5p" and cluster.devices == 64 and cluster.devices_per_node == 4
    assert rest == ["train.seq_len=2048"]
