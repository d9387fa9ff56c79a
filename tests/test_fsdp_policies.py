"""apply_fsdp's per-layer policies, on one gloo rank in this process: what the selective checkpointing policy
recomputes (torchtitan's rule: every other matmul of a layer), the last layer kept gathered from forward to
backward, and the gradient reduce dtype's rules. Their effect on the losses is tests/test_parallel_features.py's;
on memory tests/test_plan_memory.py's."""

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from lemur_torch.config import load_config, validate
from lemur_torch.errors import ConfigError
from lemur_torch.model import build_meta_model, init_weights, reset_rope_buffers
from lemur_torch.parallel import fsdp_rules
from lemur_torch.parallel.fsdp import apply_fsdp


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def built(mesh, overrides, mp_policy=None):
    cfg = load_config(["model=tiny", *overrides])
    model = build_meta_model(cfg.model)
    apply_fsdp(model, mesh, cfg.parallel, mp_policy or MixedPrecisionPolicy())
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, 0, cfg.model.initializer_range)
    return cfg, model


def backward_matmuls(mesh, ac: str) -> int:
    """Matmuls the backward of one forward runs: the gradients' (two per linear) plus what it recomputes."""
    cfg, model = built(mesh, [f"parallel.activation_checkpointing={ac}"])
    ids = torch.randint(3, 32000, (1, 32), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids).logits.float().square().mean()
    with CountMatmuls() as counter:
        loss.backward()
    return counter.mm


def test_selective_checkpointing_recomputes_every_other_matmul(one_rank_mesh):
    layers = load_config(["model=tiny"]).model.num_hidden_layers
    plain, selective, full = (backward_matmuls(one_rank_mesh, ac) for ac in ("none", "selective", "full"))
    # a Llama layer runs 7 matmuls (q, k, v, o, gate, up, down): full recomputes all of them up to the last (no
    # gradient needs down's output, and torch's checkpoint stops recomputing once it has what backward needs);
    # selective recomputes the 2nd, 4th and 6th (k, o, up) and takes q, v, gate and down from the forward
    assert full - plain == 6 * layers
    assert selective - plain == 3 * layers


@pytest.mark.parametrize("keep_last", [False, True])
def test_last_layer_stays_gathered_from_forward_to_backward(one_rank_mesh, keep_last):
    _, model = built(
        one_rank_mesh,
        [f"parallel.reshard_last_layer={str(not keep_last).lower()}"],
        MixedPrecisionPolicy(param_dtype=torch.bfloat16),
    )
    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    layers = list(model.model.layers)
    # FSDP2 registers a module's unsharded parameters while it is gathered, the DTensor shards once resharded
    gathered = [not any(isinstance(p, DTensor) for p in layer.parameters()) for layer in layers]
    assert gathered == [False] * (len(layers) - 1) + [keep_last]


def test_reduce_dtype_is_bf16_only_under_bf16_compute():
    bf16 = load_config(["parallel.mixed_precision=bf16", "parallel.reduce_dtype=bf16"])
    assert fsdp_rules.reduce_dtype(bf16, "cuda") == torch.bfloat16
    assert fsdp_rules.reduce_dtype(load_config(["parallel.mixed_precision=bf16"]), "cuda") == torch.float32
    with pytest.raises(ConfigError) as info:
        validate(load_config(["parallel.mixed_precision=fp32", "parallel.reduce_dtype=bf16"]), world_size=1)
    assert info.value.key == "parallel.reduce_dtype"


def test_the_xla_backend_refuses_selective_checkpointing():
    with pytest.raises(ConfigError) as info:
        validate(load_config(["parallel=xla_spmd", "parallel.activation_checkpointing=selective"]), world_size=1)
    assert info.value.key == "parallel.activation_checkpointing"
