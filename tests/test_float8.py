"""Float8 training (`parallel.float8`: parallel/float8.py, wired by parallel/fsdp.py) on CPU through torchao's
emulation.

The choice of recipe per device and the gate's one-line refusals; torchao's numerics checks (SQNR of one
converted layer against bf16); the filter converts exactly the tiny model's eligible linears; lemur-plan searches
the recipes. Through lemur-train's own path (the gate, build_and_fit, the Trainer): 30 steps of the tiny model
with rowwise and tensorwise follow the same run without float8, eager on 1 process and compiled with activation
checkpointing on 2 gloo processes with FSDP2 (tensorwise all-gathering float8 weights), and the start-of-run
summary counts every eligible linear converted; the float8 weights' scales are precomputed after every optimizer
step, applied or skipped; checkpoints resume across float8 and plain runs both ways (the same tensors loaded);
the HF export of a float8 run loads in transformers in a process where torchao cannot be imported.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAST, losses, read_metrics, run_train, subprocess_env, train_in_process
from torch import nn
from torch._inductor import config as inductor_config
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from lemur_torch import train
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config, validate
from lemur_torch.data import build_loader
from lemur_torch.errors import ConfigError
from lemur_torch.metrics import MetricsLogger
from lemur_torch.model import build_meta_model
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.parallel import float8, fsdp_rules
from lemur_torch.parallel.fsdp import FsdpBackend
from lemur_torch.plan.cluster import resolve
from lemur_torch.plan.predict import predict
from lemur_torch.plan.run import setting_of, shape_of
from lemur_torch.plan.search import search
from lemur_torch.tokenizer import build_tokenizer
from lemur_torch.trainer import StopSignal, Trainer

STEPS = 30
# every run compared: the tiny model, 64-token rows, 256 tokens per step (2 micro-batches of 2 rows on one
# process, 1 on each of 2), fused AdamW (as train_in_process)
RUN = [*FAST, f"train.max_steps={STEPS}", "optim.implementation=fused"]


# -- the choice ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, device, capability, backend, emulate",
    [
        ("none", "cpu", None, "fsdp", False),
        ("none", "cuda", (7, 0), "xla_spmd", False),
        ("tensorwise", "cpu", None, "fsdp", True),
        ("rowwise", "cpu", None, "fsdp", True),
        ("tensorwise", "cuda", (8, 9), "fsdp", False),
        ("rowwise", "cuda", (9, 0), "fsdp", False),
        ("rowwise", "cuda", (10, 0), "fsdp", False),
        ("mxfp8", "cuda", (10, 0), "fsdp", False),
        ("mxfp8", "cuda", (10, 3), "fsdp", False),
    ],
)
def test_select_allows(recipe, device, capability, backend, emulate):
    plan = float8.select(recipe, device, capability, backend, "NVIDIA X")
    assert plan.recipe == recipe and plan.enabled == (recipe != "none") and plan.emulate == emulate


@pytest.mark.parametrize(
    "recipe, device, capability, name, backend, says",
    [
        ("rowwise", "cuda", (8, 0), "NVIDIA A100-SXM4-80GB", "fsdp", "NVIDIA A100-SXM4-80GB (sm_80)"),
        ("tensorwise", "cuda", (8, 6), "NVIDIA A10", "fsdp", "NVIDIA A10 (sm_86)"),
        ("mxfp8", "cuda", (9, 0), "NVIDIA H100 80GB HBM3", "fsdp", "NVIDIA H100 80GB HBM3 (sm_90)"),
        ("mxfp8", "cpu", None, "", "fsdp", "CPU"),
        ("tensorwise", "mps", None, "", "fsdp", "mps"),
        ("tensorwise", "cpu", None, "", "xla_spmd", "xla_spmd"),
        ("rowwise", "cuda", (9, 0), "", "xla_spmd", "xla_spmd"),
        ("mxfp8", "cuda", (10, 0), "", "xla_spmd", "xla_spmd"),
        ("fp8", "cuda", (9, 0), "", "fsdp", "unknown float8 recipe 'fp8'"),
    ],
)
def test_select_refuses_in_one_line_naming_the_key_and_device(recipe, device, capability, name, backend, says):
    with pytest.raises(ConfigError) as err:
        float8.select(recipe, device, capability, backend, name)
    assert err.value.key == "parallel.float8"
    assert says in str(err.value) and "\n" not in str(err.value)


def test_select_for_this_device_is_the_cpu_emulation():
    plan = float8.select_for_device("rowwise", torch.device("cpu"))
    assert plan == float8.select("rowwise", "cpu") and plan.emulate and plan.device == "CPU"


# -- numerics of one layer (torchao's test style: SQNR against the bf16 layer) ----------------------------


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "mxfp8"])
def test_one_layer_sqnr_against_bf16(recipe):
    from torchao.float8.float8_utils import compute_error

    torch.manual_seed(0)
    # the tiny model's gate_proj shape; mxfp8 runs its emulated kernels here (select refuses it off Blackwell)
    plan = float8.Float8Plan(recipe, emulate=True, device="CPU")
    ref = nn.ModuleDict({"gate_proj": nn.Linear(128, 352, bias=False)}).to(torch.bfloat16)
    f8 = nn.ModuleDict({"gate_proj": nn.Linear(128, 352, bias=False)}).to(torch.bfloat16)
    f8.load_state_dict(ref.state_dict())
    conversion = float8.convert(f8, plan, all_gather=False)
    assert conversion.converted == conversion.eligible == 1
    x = torch.randn(2, 64, 128, dtype=torch.bfloat16)
    x_ref, x_f8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_f8 = ref["gate_proj"](x_ref), f8["gate_proj"](x_f8)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_f8.backward(grad)
    out = compute_error(y_ref, y_f8).item()
    grad_in = compute_error(x_ref.grad, x_f8.grad).item()
    grad_w = compute_error(ref["gate_proj"].weight.grad, f8["gate_proj"].weight.grad).item()
    assert 18 <= out < 60, out  # torchao's threshold; finite: the output did go through float8
    assert grad_in >= 17 and grad_w >= 17, (grad_in, grad_w)
    assert y_f8.dtype == torch.bfloat16


# -- what is converted -----------------------------------------------------------------------------------


def _expected_eligible(m) -> int:
    """The decoder layers' linears whose in and out features are multiples of 16, from the config alone."""
    head_dim = m.hidden_size // m.num_attention_heads
    h, kv, i = m.hidden_size, m.num_key_value_heads * head_dim, m.intermediate_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return m.num_hidden_layers * sum(a % 16 == 0 and b % 16 == 0 for a, b in shapes)


def test_filter_converts_every_eligible_linear_of_the_tiny_model():
    from torchao.float8.float8_linear import Float8Linear

    m = load_config(["model=tiny"]).model
    model = build_meta_model(m)
    conversion = float8.convert(model, float8.select("rowwise", "cpu"), all_gather=False)
    expected = _expected_eligible(m)
    assert expected == 7 * m.num_hidden_layers > 0, "the tiny model's shapes must leave every linear eligible"
    assert conversion.converted == conversion.eligible == expected
    assert conversion.linears == expected + 1  # lm_head
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert isinstance(proj, Float8Linear) and proj.config.emulate
    assert conversion.describe() == (
        f"float8 rowwise (emulated on CPU): {expected} of {expected} eligible linears; "
        "lm_head and embeddings in high precision"
    )


def test_linears_not_multiples_of_16_stay_high_precision():
    m = load_config(["model=tiny", "model.intermediate_size=360"]).model  # gate/up/down: 360 = 22.5 x 16
    model = build_meta_model(m)
    conversion = float8.convert(model, float8.select("tensorwise", "cpu"), all_gather=True)
    assert conversion.converted == conversion.eligible == _expected_eligible(m) == 4 * m.num_hidden_layers
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    assert f"({3 * m.num_hidden_layers} with dimensions not multiples of 16" in conversion.describe()
    assert conversion.describe().startswith("float8 tensorwise, float8 all-gather (emulated on CPU)")


def test_none_converts_nothing():
    model = build_meta_model(load_config(["model=tiny"]).model)
    conversion = float8.convert(model, float8.select("none", "cpu"))
    assert conversion.converted == 0 and conversion.precompute is None
    assert all(type(mod) is nn.Linear for mod in model.modules() if isinstance(mod, nn.Linear))


# -- the gate: one line naming parallel.float8 ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ["parallel.float8=mxfp8"],
            "mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200); this process runs on CPU",
        ),
        (["parallel=xla_spmd", "parallel.float8=rowwise"], "rowwise is not available with parallel.backend=xla_spmd"),
        (["parallel.float8=fp8"], "parallel.float8"),
    ],
)
def test_the_gate_refuses_float8_where_it_cannot_run(monkeypatch, capsys, overrides, says):
    def tripwire(cfg):
        raise AssertionError("the gate let the run through to build_and_fit")

    monkeypatch.setattr(train, "build_and_fit", tripwire)
    assert train.main(["model=tiny", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("config error at 'parallel.float8'") and says in err, err


def test_the_gate_takes_the_cpu_emulation_and_the_yaml_shows_the_key():
    cfg = load_config(["model=tiny", "parallel.float8=tensorwise"])
    validate(cfg, 1)
    assert fsdp_rules.float8_plan(cfg, torch.device("cpu")) == float8.Float8Plan("tensorwise", True, "CPU")
    for group in ("fsdp", "hsdp", "xla_spmd"):
        assert load_config([f"parallel={group}"]).parallel.float8 == "none"


def test_float8_on_a_gpu_trains_in_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    cfg = load_config(["parallel.float8=rowwise", "parallel.mixed_precision=fp32"])
    with pytest.raises(ConfigError) as err:
        fsdp_rules.float8_plan(cfg, gpu)
    assert err.value.key == "parallel.float8" and "parallel.mixed_precision=bf16" in str(err.value)
    cfg.parallel.mixed_precision = "auto"  # bf16 on CUDA
    plan = fsdp_rules.float8_plan(cfg, gpu)
    assert plan.recipe == "rowwise" and not plan.emulate and plan.device == "NVIDIA H100 80GB HBM3 (sm_90)"


# -- the planner ranks the recipes ------------------------------------------------------------------------


def test_lemur_plan_reads_and_searches_parallel_float8():
    cfg = load_config(
        ["experiment=lemur_70b_pretrain", "cluster.device=h100_sxm", "cluster.devices=256", "parallel.float8=rowwise"]
    )
    cluster = resolve(cfg.cluster)
    s = setting_of(cfg, cluster)
    assert s.float8 and s.float8_recipe == "rowwise" and not s.float8_all_gather
    tensorwise, plain = s.replace(float8_recipe="tensorwise"), s.replace(float8=False)
    shape = shape_of(cfg)
    gathered = {k: predict(shape, v, cluster).time.parts["communication_total"] for k, v in
                {"rowwise": s, "tensorwise": tensorwise, "none": plain}.items()}  # fmt: skip
    assert gathered["tensorwise"] < gathered["rowwise"] == pytest.approx(gathered["none"])  # float8 all-gather
    found = search(
        shape, s.replace(float8=False), cluster, int(cfg.train.global_batch_tokens), 10, float8_available=True
    )
    recipes = {next((o for o in c.overrides if o.startswith("parallel.float8=")), "none") for c in found}
    assert recipes == {"none", "parallel.float8=tensorwise", "parallel.float8=rowwise"}
    for c in found[:3]:  # the overrides a candidate names compose into a run config
        load_config(["experiment=lemur_70b_pretrain", *[o for o in c.overrides if o not in c.pending]])
    # no fp8 tensor cores on an A100: float8 is not searched there
    a100 = resolve(cfg.cluster, "a100_80gb")
    found = search(shape, s.replace(float8=False), a100, int(cfg.train.global_batch_tokens), 10, float8_available=True)
    assert found and not any(o.startswith("parallel.float8=") for c in found for o in c.overrides)


# -- training through lemur-train's path: float8 follows the same run without it ---------------------------


def _assert_follows(ref, got, tolerance=0.03):
    """`got` (step -> loss) within `tolerance` of `ref` from step 10 on, not equal to it, with the same trend."""
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    ref, got = [ref[s] for s in sorted(ref)], [got[s] for s in sorted(got)]
    worst = max(abs(g - r) / r for g, r in zip(got[9:], ref[9:]))
    assert worst < tolerance, f"loss differs by {worst:.2%} from the plain run after step 10"
    assert got != ref, "identical losses: float8 did not change a single matmul"
    drop_ref, drop = sum(ref[:5]) / 5 - sum(ref[-5:]) / 5, sum(got[:5]) / 5 - sum(got[-5:]) / 5
    assert drop_ref > 0.5 and abs(drop - drop_ref) < 0.1 * drop_ref, (drop_ref, drop)  # the same trend
    return worst


def _summary_float8(stdout: str) -> str:
    return next(line.split("float8", 1)[1].strip() for line in stdout.splitlines() if line.startswith("  float8"))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """No float8, rowwise and tensorwise, eager on one fp32 process, through the gate and build_and_fit in this
    process (the plain run keeps its last checkpoint): recipe -> (run_dir, step -> loss, start-of-run summary)."""
    runs = {}
    # rowwise sets inductor's emulate_precision_casts process-wide (parallel/float8.py): restored for later tests
    with inductor_config.patch(emulate_precision_casts=inductor_config.emulate_precision_casts):
        for recipe in ("none", "rowwise", "tensorwise"):
            run_dir = str(tmp_path_factory.mktemp(f"float8_1rank_{recipe}") / "run")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                got = train_in_process([*RUN, f"parallel.float8={recipe}", "checkpoint.save_at_end=true"], run_dir)
            runs[recipe] = (run_dir, got, out.getvalue())
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_one_process_float8_follows_the_plain_run(one_rank, recipe):
    _, ref, plain_out = one_rank["none"]
    _, got, out = one_rank[recipe]
    _assert_follows(ref, got)
    n = _expected_eligible(load_config(["model=tiny"]).model)
    assert _summary_float8(out) == (
        f"float8 {recipe} (emulated on CPU): {n} of {n} eligible linears; lm_head and embeddings in high precision"
    )
    assert _summary_float8(plain_out) == "none (high-precision matmuls)"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """rowwise and tensorwise on 2 gloo processes under torchrun (FSDP2; tensorwise all-gathers float8 weights),
    compiled per layer with activation checkpointing; tensorwise also exports: recipe -> (run_dir, stdout)."""
    runs = {}
    for recipe in ("rowwise", "tensorwise"):
        run_dir = str(tmp_path_factory.mktemp(f"float8_2ranks_{recipe}") / "run")
        overrides = [
            *RUN,
            f"parallel.float8={recipe}",
            "parallel.compile=true",
            "parallel.activation_checkpointing=full",
        ]
        export = [f"checkpoint.export_at_end={str(recipe == 'tensorwise').lower()}"]
        proc = run_train([*overrides, *export, f"run_dir={run_dir}"], nproc=2, timeout=900)
        runs[recipe] = (run_dir, proc.stdout)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_two_processes_compiled_float8_follows_the_plain_run(one_rank, two_ranks, recipe):
    # 1 and 2 processes train the same model (tests/test_fsdp_train.py): the plain reference is the 1-process run
    _, ref, _ = one_rank["none"]
    run_dir, out = two_ranks[recipe]
    _assert_follows(ref, losses(run_dir))
    gather = ", float8 all-gather" if recipe == "tensorwise" else ""
    assert _summary_float8(out).startswith(f"float8 {recipe}{gather} (emulated on CPU): 28 of 28 eligible linears")
    assert "mesh dp_shard=2" in out


# -- the scales of the float8 all-gather, after every optimizer step -----------------------------------------


def _build_trainer(overrides, run_dir):
    """The parts build_and_fit builds, as it builds them (train.py), without fitting: (trainer, device batches)."""
    cfg = load_config([*RUN, *overrides, f"run_dir={run_dir}"])
    validate(cfg, 1)
    backend = FsdpBackend(cfg)
    logger = MetricsLogger(cfg, enabled=True)
    loader = build_loader(cfg.data, build_tokenizer(cfg.data), cfg.train.seq_len, cfg.train.micro_batch_size, 0, 1,
                          cfg.train.seed)  # fmt: skip
    model = backend.setup_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, "cpu")
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    checkpointer = Checkpointer(cfg, backend, logger.info)
    trainer = Trainer(cfg, backend, model, optimizer, scheduler, loader, checkpointer, logger, StopSignal())
    return trainer, backend.device_batches(iter(loader))


def _close(trainer):
    trainer.checkpointer.close()
    trainer.logger.close()
    trainer.backend.shutdown()


def _step(trainer, batches):
    trainer.train_step([next(batches) for _ in range(trainer.grad_accum)])
    trainer.settle()


def _weight_scales(model):
    """Each float8 all-gather weight: (its precomputed scale, the scale of its current values computed here)."""
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        local = getattr(weight, "_local_tensor", None)
        if type(local).__name__ == "WeightWithDynamicFloat8CastTensor":
            values = float8.unwrap_weight(weight).full_tensor()
            want = (torch.finfo(torch.float8_e4m3fn).max / values.abs().max().double().clamp(min=1e-12)).float()
            out.append((local._precomputed_scale, want))
    return out


@pytest.mark.slow
def test_tensorwise_scales_are_precomputed_after_every_step_applied_or_skipped(tmp_path, monkeypatch):
    """One process in bf16 is sharded (fully_shard casts), so tensorwise all-gathers float8 weights here too.
    After each optimizer step the backend's hook leaves every weight's scale equal to its new values' scale; after
    a step the guard skipped it runs as well (the host does not know which without a sync) and finds the same
    scales, the weights being unchanged; and every all-gather of a converted weight carries float8."""
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    gathered = []
    hook = WeightWithDynamicFloat8CastTensor.fsdp_pre_all_gather

    @functools.wraps(hook)  # FSDP2 reads the hook's signature
    def counted(self, *args, **kwargs):
        out = hook(self, *args, **kwargs)
        gathered.append(out[0][0].dtype)
        return out

    monkeypatch.setattr(WeightWithDynamicFloat8CastTensor, "fsdp_pre_all_gather", counted)
    trainer, batches = _build_trainer(["parallel.float8=tensorwise", "parallel.mixed_precision=bf16"], tmp_path)
    try:
        model, backend = trainer.model, trainer.backend
        assert backend.float8_conversion.all_gather and backend.float8_conversion.converted == 28
        assert len(_weight_scales(model)) == 28 and all(have is None for have, _ in _weight_scales(model))
        for _ in range(2):
            before = [want for _, want in _weight_scales(model)]
            _step(trainer, batches)
            scales = _weight_scales(model)
            assert all(torch.equal(have, want) for have, want in scales)
            assert any(not torch.equal(want, old) for (_, want), old in zip(scales, before))  # the weights moved
        assert gathered == [torch.float8_e4m3fn] * (28 * 2 * trainer.grad_accum * 2)  # forward and backward
        # a step whose guard fails: the update is skipped on the device, the hook runs all the same
        weights = {k: v.full_tensor().clone() for k, v in float8.plain_state_dict(model.state_dict()).items()}
        before = [want for _, want in _weight_scales(model)]
        for module in model.modules():
            local = getattr(getattr(module, "weight", None), "_local_tensor", None)
            if local is not None and hasattr(local, "_precomputed_scale"):
                local._precomputed_scale = None
        clip = backend.clip_grad_norm_
        monkeypatch.setattr(backend, "clip_grad_norm_", lambda m, n: clip(m, n) * float("inf"))
        _step(trainer, batches)
        assert read_metrics(str(tmp_path))[-1]["skipped_steps"] == 1
        after = float8.plain_state_dict(model.state_dict())
        assert all(torch.equal(after[k].full_tensor(), v) for k, v in weights.items())
        assert all(torch.equal(have, old) for (have, _), old in zip(_weight_scales(model), before))
        state = backend.state_dict_for_checkpoint(model, trainer.optimizer)
        assert {type(v.to_local()) for v in state["model"].values()} == {torch.Tensor}  # what DCP writes
    finally:
        _close(trainer)


# -- checkpoints and the export hold ordinary weights ------------------------------------------------------


def _checkpoint(run_dir):
    ckpts = os.path.join(run_dir, "checkpoints")
    return os.path.join(ckpts, sorted(os.listdir(ckpts))[-1])


def _resume_and_compare(overrides, ckpt, tmp_path):
    """Resume a run with `overrides` from `ckpt` through the Trainer; every parameter and AdamW moment it loaded
    equals the checkpoint's, tensor by tensor; then one more step trains. Returns the model's raw tensor types."""
    dcp_to_torch_save(ckpt, str(tmp_path / "ckpt.pt"))
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    run = [*overrides, f"checkpoint.resume={ckpt}", f"train.max_steps={STEPS + 1}"]
    trainer, batches = _build_trainer(run, tmp_path / "resumed")
    try:
        trainer.maybe_resume()
        assert trainer.step == STEPS
        model = trainer.model
        loaded = float8.plain_state_dict(get_model_state_dict(model))
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in loaded.items()}
        assert sorted(full) == sorted(saved["model"]) and all(torch.equal(full[k], saved["model"][k]) for k in full)
        moments = get_optimizer_state_dict(model, trainer.optimizer)["state"]
        for key, state in saved["optim"]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                got = moments[key][name]
                assert torch.equal(got.full_tensor() if hasattr(got, "full_tensor") else got, state[name]), key
        raw = {type(getattr(v, "_local_tensor", v)).__name__ for v in model.state_dict().values()}
        _step(trainer, batches)
        line = read_metrics(str(tmp_path / "resumed"))[-1]
        assert line["step"] == STEPS + 1 and line["skipped_steps"] == 0 and line["loss"] < 10
        return raw
    finally:
        _close(trainer)


@pytest.mark.slow
def test_a_float8_checkpoint_resumes_without_float8(two_ranks, tmp_path):
    # written by 2 processes from tensorwise's float8 all-gather weights; read by 1 plain fp32 process
    raw = _resume_and_compare(["parallel.float8=none"], _checkpoint(two_ranks["tensorwise"][0]), tmp_path)
    assert raw == {"Tensor"}  # no torchao weight wrapper in the plain model


@pytest.mark.slow
def test_a_plain_checkpoint_resumes_with_float8(one_rank, tmp_path):
    # written by a plain fp32 process; read into tensorwise's float8 all-gather weights (bf16: sharded)
    run = ["parallel.float8=tensorwise", "parallel.mixed_precision=bf16"]
    raw = _resume_and_compare(run, _checkpoint(one_rank["none"][0]), tmp_path)
    assert "WeightWithDynamicFloat8CastTensor" in raw


@pytest.mark.slow
def test_the_export_of_a_float8_run_loads_in_transformers_without_torchao(two_ranks):
    """In a process where torchao cannot be imported (transformers then sees none installed): the export loads,
    equals the run's last checkpoint tensor by tensor, and its logits are those of a plain LlamaForCausalLM holding
    that checkpoint (read by DCP: no torchao class in it either)."""
    run_dir = two_ranks["tensorwise"][0]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torchao"] = None  # an import of torchao fails; importlib.util.find_spec says it is absent
        import torch, torch.distributed.checkpoint as dcp
        from transformers import LlamaForCausalLM
        hf = LlamaForCausalLM.from_pretrained({os.path.join(run_dir, "hf")!r})
        ref = LlamaForCausalLM(hf.config)
        state = {{k: torch.empty_like(v) for k, v in ref.state_dict().items()}}
        dcp.load({{"model": state}}, checkpoint_id={_checkpoint(run_dir)!r}, no_dist=True)
        ref.load_state_dict(state)
        assert all(torch.equal(v, state[k]) for k, v in hf.state_dict().items())
        ids = torch.arange(3, 67).view(1, -1)
        with torch.no_grad():
            assert torch.equal(hf(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert not [m for m, v in sys.modules.items() if m.split(".")[0] == "torchao" and v is not None]
        print("plain export")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "plain export" in proc.stdout, proc.stderr[-4000:]


# -- mxfp8 -------------------------------------------------------------------------------------------------


def test_mxfp8_path_runs_emulated_under_fsdp2():
    """mxfp8's conversion (torchao's emulated MX kernels: select refuses mxfp8 off Blackwell) under FSDP2 with
    bf16 compute: it trains, its first loss is the plain model's within 1%, and its state is plain."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lemur_torch.model import init_weights, reset_rope_buffers
    from lemur_torch.parallel.fsdp import apply_fsdp

    cfg = load_config(["model=tiny"])
    ids = torch.randint(3, 32000, (2, 64), generator=torch.Generator().manual_seed(0))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        losses = {}
        for recipe in ("none", "mxfp8"):
            model = build_meta_model(cfg.model)
            plan = float8.Float8Plan(recipe, emulate=True, device="CPU")
            mesh, mp = init_device_mesh("cpu", (1,)), MixedPrecisionPolicy(torch.bfloat16)
            conversion = apply_fsdp(model, mesh, cfg.parallel, mp, plan)
            model.to_empty(device="cpu")
            reset_rope_buffers(model, torch.device("cpu"))
            init_weights(model, 0, cfg.model.initializer_range)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses[recipe] = []
            for _ in range(3):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses[recipe].append(loss.item())
        assert conversion.converted == conversion.eligible == 28
        state = float8.plain_state_dict(model.state_dict())
        assert {type(v.to_local()).__name__ for v in model.state_dict().values()} == {
            "Tensor",
            "MXFP8TrainingWeightWrapperTensor",
        }
        assert {type(v.to_local()) for v in state.values()} == {torch.Tensor}
    finally:
        dist.destroy_process_group()
    assert (
        abs(losses["mxfp8"][0] - losses["none"][0]) < 0.01 * losses["none"][0]
        and losses["mxfp8"][0] != losses["none"][0]
    )
    assert losses["mxfp8"][-1] < losses["mxfp8"][0] - 0.2
