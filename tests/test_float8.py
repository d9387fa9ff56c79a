"""Float8 training (parallel/float8.py) on CPU through torchao's emulation.

The choice of recipe per device; torchao's numerics checks (SQNR of one converted layer against bf16); the filter
converts exactly the tiny model's eligible linears; 30 steps of the tiny model with rowwise and tensorwise
follow the same run without float8, on 1 process and on 2 gloo processes with FSDP2 (tensorwise all-gathering
float8 weights), compiled with activation checkpointing on 1 process; and what a float8 run saves is plain: the
HF keys and ordinary tensors, loaded by a model without float8 (and without torchao) and the reverse.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import subprocess_env
from torch import nn

from lemur_torch.config import load_config
from lemur_torch.errors import ConfigError
from lemur_torch.model import build_meta_model
from lemur_torch.parallel import float8

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "float8_train.py")
STEPS = 30


def _script():
    spec = importlib.util.spec_from_file_location("float8_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# -- training: float8 follows the same run without it -----------------------------------------------------


def _assert_follows(plain, run, tolerance=0.03):
    ref, got = plain["losses"], run["losses"]
    assert len(ref) == len(got) == STEPS
    worst = max(abs(g - r) / r for g, r in zip(got[9:], ref[9:]))
    assert worst < tolerance, f"{run['recipe']}: loss differs by {worst:.2%} from the plain run after step 10"
    assert got != ref, "identical losses: float8 did not change a single matmul"
    drop_ref, drop = sum(ref[:5]) / 5 - sum(ref[-5:]) / 5, sum(got[:5]) / 5 - sum(got[-5:]) / 5
    assert drop_ref > 0.5 and abs(drop - drop_ref) < 0.1 * drop_ref, (drop_ref, drop)  # the same trend
    assert run["converted"] == run["eligible"] == 28


@pytest.fixture(scope="module")
def one_rank_plain():
    return _script().train("none", STEPS)


@pytest.mark.slow  # two float8 runs and a plain one, in this process: seconds each
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_one_process_float8_follows_the_plain_run(one_rank_plain, recipe):
    run = _script().train(recipe, STEPS)
    _assert_follows(one_rank_plain, run)
    assert not run["all_gather"] and run["raw_types"] == ["Tensor"]


@pytest.mark.slow
def test_compiled_with_activation_checkpointing_follows_the_plain_run(one_rank_plain):
    # the backend's order: float8 conversion, then checkpoint wrapper, then per-layer compile
    run = _script().train("rowwise", STEPS, compile=True, ac="full")
    _assert_follows(one_rank_plain, run)
    assert run["compiled_layers"] == run["checkpointed_layers"] == 4


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("float8_2ranks")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        SCRIPT,
        "--recipes=none,tensorwise,rowwise",
        f"--steps={STEPS}",
        f"--save-dir={out}",
        f"--out={out / 'results.json'}",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(out / "results.json") as f:
        return out, {r["recipe"]: r for r in json.load(f)}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_two_ranks_fsdp2_float8_follows_the_plain_run(two_ranks, recipe):
    _, runs = two_ranks
    run = runs[recipe]
    assert run["world_size"] == 2
    _assert_follows(runs["none"], run)
    if recipe == "tensorwise":
        # every converted weight all-gathered in float8, forward and backward, every step; scales precomputed
        assert run["all_gather"] and run["float8_all_gathers"] == {"torch.float8_e4m3fn": 28 * 2 * STEPS}
        assert run["precomputed_scales"] == 28
        assert "WeightWithDynamicFloat8CastTensor" in run["raw_types"]  # what plain_state_dict unwraps
    else:
        assert not run["all_gather"] and run["float8_all_gathers"] == {}


@pytest.mark.slow
def test_float8_checkpoints_are_plain_both_ways(two_ranks, tmp_path):
    out, runs = two_ranks
    for recipe in ("tensorwise", "rowwise"):
        assert runs[recipe]["state_keys"] == runs["none"]["state_keys"]  # the HF keys
        assert runs[recipe]["plain_types"] == ["Tensor"] and runs[recipe]["optim_types"] == ["Tensor"]
    # a float8 checkpoint loads into a plain LlamaForCausalLM in a process where torchao cannot be imported,
    # and its HF safetensors load in transformers there
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torchao"] = None  # any import of torchao fails
        import torch, torch.distributed.checkpoint as dcp
        from transformers import LlamaForCausalLM
        from lemur_torch.config import load_config
        from lemur_torch.model import build_meta_model, hf_llama_config
        model = build_meta_model(load_config(["model=tiny"]).model).to_empty(device="cpu")
        state = model.state_dict()
        dcp.load(state, checkpoint_id="{out / "tensorwise"}", no_dist=True)
        weights = torch.load("{out / "tensorwise" / "weights.pt"}")
        assert sorted(weights) == sorted(state)
        assert all(torch.equal(state[k], weights[k]) for k in weights)
        hf = LlamaForCausalLM(hf_llama_config(load_config(["model=tiny"]).model))
        hf.load_state_dict(weights)
        hf.save_pretrained("{tmp_path / "hf"}")
        back = LlamaForCausalLM.from_pretrained("{tmp_path / "hf"}")
        ids = torch.arange(3, 40).view(1, -1)
        assert torch.equal(back(input_ids=ids).logits, hf(input_ids=ids).logits)
        assert "torchao" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None]
        print("plain")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "plain" in proc.stdout, proc.stderr[-4000:]
    # the reverse: the plain 2-rank checkpoint resumes into a float8 model whose weights are torchao's float8
    # all-gather wrappers (FSDP2 on one process with bf16 compute), unchanged
    loaded = _script().train("tensorwise", 0, bf16=True, load_dir=str(out / "none"), save_dir=str(tmp_path / "re"))
    assert "WeightWithDynamicFloat8CastTensor" in loaded["raw_types"]
    want, got = torch.load(out / "none" / "weights.pt"), torch.load(tmp_path / "re" / "weights.pt")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
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
            conversion = float8.convert(model, plan)
            apply_fsdp(model, init_device_mesh("cpu", (1,)), cfg.parallel, MixedPrecisionPolicy(torch.bfloat16))
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
