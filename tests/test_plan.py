"""lemur-plan: the real FSDP2 sharding at 512 ranks, the CLI, and the model's physics checked against its own
references (the trainer's FLOP and parameter counts, orderings every plan must respect)."""

import json
import subprocess
import sys
import time

import pytest
from conftest import run_python

from lemur_torch.config import ClusterConfig, DeviceKind, load_config
from lemur_torch.model import count_params, flops_per_token
from lemur_torch.plan import cli
from lemur_torch.plan.cluster import resolve
from lemur_torch.plan.devices import DEVICES, kind_of
from lemur_torch.plan.memory import GIB
from lemur_torch.plan.predict import predict
from lemur_torch.plan.run import plan_run, setting_of, shape_of
from lemur_torch.plan.search import search
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape, padded_shard, spmd_shard

PRETRAIN = ["experiment=lemur_70b_pretrain"]


@pytest.mark.slow
def test_llama2_70b_shards_over_512_ranks():
    # its own process: the fake process group is process-global
    proc = run_python(["-m", "lemur_torch.plan", "--world-size", "512", "model=llama2_70b"], timeout=300)
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


def test_plan_json_for_the_shipped_70b_config_on_512_h100(capsys):
    assert cli.main(["--json", *PRETRAIN, "cluster.device=h100_sxm", "cluster.devices=512"]) == 0
    plan = json.loads(capsys.readouterr().out)
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


@pytest.mark.slow
def test_the_plan_runs_without_torch():
    """lemur-plan composes, checks and plans without importing torch (or transformers): seconds of imports on a
    loaded CPU that a plan does not need, and what keeps it fast. `python -m lemur_torch.plan` as well."""
    script = (
        "import sys\n"
        "from lemur_torch.plan.cli import main\n"
        "assert main(['experiment=lemur_70b_pretrain', 'cluster=h100_sxm_512']) == 0\n"
        "assert main(['--search', '--top', '1', 'experiment=lemur_70b_pretrain', 'cluster=h100_sxm_512']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    module = subprocess.run(
        [sys.executable, "-m", "lemur_torch.plan", *PRETRAIN, "cluster=h100_sxm_256"], capture_output=True, text=True
    )
    assert module.returncode == 0 and "bottleneck:" in module.stdout, module.stderr


@pytest.mark.slow
@pytest.mark.parametrize("flags, limit_s", [([], 10), (["--search"], 60)])
def test_a_plan_takes_seconds_and_a_search_under_a_minute(flags, limit_s):
    """The acceptance bounds, for a whole `lemur-plan` process (interpreter start and config composition
    included) on this CPU: a plan of the 70B config on 512 H100 in 10 s, its search in 60 s."""
    args = [sys.executable, "-m", "lemur_torch.plan", *flags, *PRETRAIN, "cluster.device=h100_sxm"]
    start = time.monotonic()
    proc = subprocess.run([*args, "cluster.devices=512"], capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "bottleneck" in proc.stdout and elapsed < limit_s, elapsed


@pytest.mark.parametrize(
    "args, key",
    [
        (["cluster.device=h100_sxm", "cluster.devices=0"], "cluster.devices"),
        (["cluster.device=tpu_v9", "cluster.devices=8"], "cluster.device"),
        (["cluster=h100_sxm_512", "cluster.inter_node_gbps=-5"], "cluster.inter_node_gbps"),
        (["cluster.device=h100_sxm", "cluster.devices=abc"], "cluster.devices"),
        (["cluster=h100_sxm_512", "cluster.memory=80"], "cluster.memory"),
        (["cluster.device=h100_sxm", "cluster.devices=12"], "cluster.devices_per_node"),
        (["cluster.devices=512"], "cluster.device"),
        (["cluster.device=h100_sxm"], "cluster.devices"),
        (["cluster=h200_sxm_512"], "cluster"),
    ],
)
def test_bad_cluster_settings_are_one_line_errors(args, key, capsys):
    assert cli.main([*PRETRAIN, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err, err


def test_a_tpu_needs_the_xla_backend(capsys):
    assert cli.main([*PRETRAIN, "cluster.device=tpu_v4", "cluster.devices=256"]) == 2
    assert "'cluster.device'" in capsys.readouterr().err


def h100(devices, **kw):
    return resolve(ClusterConfig(device=DeviceKind.h100_sxm, devices=devices, **kw))


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
    shape, s, cluster = shipped(512, compile=True, reduce_dtype="fp32")
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


def test_the_cluster_group_composes_with_the_run_config():
    cfg = load_config(["cluster.device=tpu_v5p", "cluster.devices=64", "train.seq_len=2048"])
    cluster = resolve(cfg.cluster)
    assert cluster.device.kind == "tpu_v5p" and cluster.devices == 64 and cluster.devices_per_node == 4
    assert cfg.train.seq_len == 2048
    shipped = resolve(load_config(["cluster=h100_sxm_512"]).cluster)
    assert (shipped.device.kind, shipped.devices, shipped.nodes) == ("h100_sxm", 512, 64)
    unplanned = load_config([]).cluster  # a plain run: nothing planned
    assert unplanned.device is None and unplanned.devices is None


def test_the_device_kinds_are_the_tables_and_the_backends_names_map_to_them():
    assert [k.value for k in DeviceKind] == list(DEVICES)
    names = {
        "NVIDIA H100 80GB HBM3": "h100_sxm",
        "NVIDIA H100 PCIe": "h100_pcie",
        "NVIDIA H100 NVL": None,
        "NVIDIA H200": "h200",
        "NVIDIA A100-SXM4-80GB": "a100_80gb",
        "NVIDIA A100-SXM4-40GB": None,
        "NVIDIA B200": "b200",
        "TPU v4": "tpu_v4",
        "TPU v5 lite": "tpu_v5e",
        "TPU v5": "tpu_v5p",
        "TPU v6 lite": "tpu_v6e",
        "cpu": None,
    }
    assert {name: kind_of(name) for name in names} == names


@pytest.mark.slow
def test_the_closed_form_sharding_is_fsdp2s_for_several_shapes_and_world_sizes():
    """The plan's per-rank state (shape.padded_shard, no model built) against FSDP2's real wrapping on a fake
    process group (plan/sharding.py), for shapes and world sizes that shard evenly and unevenly."""
    cases = [("tiny", 3), ("tiny", 64), ("llama2_7b", 24), ("llama2_13b", 1000), ("llama2_70b", 96)]
    script = (
        "import json, sys\n"
        "from lemur_torch.config import load_config\n"
        "from lemur_torch.plan.sharding import shard_on_fake_pg\n"
        "cases = json.loads(sys.argv[1])\n"
        "print(json.dumps([shard_on_fake_pg(load_config([f'model={m}']), n)['padded_local_params'] for m, n in cases]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    real = json.loads(proc.stdout)
    for (model, world), count in zip(cases, real):
        shape = ModelShape.from_model_config(load_config([f"model={model}"]).model)
        assert padded_shard(shape.layer_tensors() * shape.layers + shape.root_tensors(), world) == count, model


@pytest.mark.parametrize("tensor", [1, 2, 4])
def test_the_xla_sharding_spreads_the_state_over_every_device(tensor):
    shape = ModelShape.from_model_config(load_config(["model=llama2_70b"]).model)
    local = spmd_shard(shape.all_shapes(), 256 // tensor, tensor)
    # the layers' projections are cut over both mesh axes, everything else (embeddings, norms) over fsdp alone
    expected = shape.layers * shape.layer_matmul_params / 256 + (
        shape.total_params - shape.layers * shape.layer_matmul_params
    ) / (256 // tensor)
    assert expected <= local < expected * 1.01


def tpu_plan(*overrides):
    cfg = load_config(["experiment=lemur_70b_pretrain_tpu_v4", "cluster=tpu_v4_512", *overrides])
    return plan_run(cfg, resolve(cfg.cluster))


def test_the_xla_plan_models_scan_layers_and_the_tensor_axis():
    plain, scan, tensor = tpu_plan(), tpu_plan("parallel.scan_layers=true"), tpu_plan("parallel.xla_tensor=2")
    shape = plain.shape
    # scan_layers: the stacked fp32 copy of the device's share of the layers' weights, and of their gradients
    layers_share = plain.memory.components["params"] * shape.layers * shape.layer_params / shape.total_params
    assert scan.memory.components["scan_stacks"] == pytest.approx(2 * layers_share, rel=1e-6)
    assert scan.step_time_s == pytest.approx(plain.step_time_s)
    # a tensor group of 2 gathers half of each layer's projections, shares its rows, and all-reduces activations
    layer_p = shape.layer_matmul_params + 2 * shape.hidden
    half = (shape.layer_matmul_params / 2 + 2 * shape.hidden) / layer_p
    assert tensor.memory.components["gathered_layers"] / plain.memory.components["gathered_layers"] == pytest.approx(
        half, rel=1e-6
    )
    assert tensor.setting.device_tokens == 2 * plain.setting.device_tokens
    assert tensor.time.parts["tensor_parallel"] > 0 == plain.time.parts["tensor_parallel"]


def test_the_tpu_search_varies_the_xla_backends_settings():
    cfg = load_config(["experiment=lemur_70b_pretrain_tpu_v4", "cluster.device=tpu_v5p", "cluster.devices=512"])
    cluster = resolve(cfg.cluster)
    found = search(shape_of(cfg), setting_of(cfg, cluster), cluster, cfg.train.global_batch_tokens, 1)
    assert found and all(c.plan.setting.backend == "xla_spmd" and c.plan.setting.ac != "selective" for c in found)
    assert {c.plan.setting.tensor for c in found} > {1}
    assert all(any(o.startswith("parallel.xla_tensor=") for o in c.overrides) for c in found)
