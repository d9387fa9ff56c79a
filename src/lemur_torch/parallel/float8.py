"""Float8 training through torchao: the choice of recipe for a device, the conversion of the model's linears,
the per-step hook of the float8 all-gather, and the start-of-run line that says what runs.

`parallel.float8` is one of `RECIPES`:
- `tensorwise`: one dynamic scale per tensor (torchao's fastest recipe); with FSDP2 the weights are cast to
  float8 before the all-gather (half the bf16 traffic), and their scales are computed for all layers at once
  after each optimizer step (`Float8Conversion.after_optimizer_step`: one all-reduce instead of one per layer);
- `rowwise`: one scale per row (more accurate); weights travel in the run's high precision;
- `mxfp8`: blocks of 32 values sharing a power-of-two scale, on Blackwell (compute capability 10.x) only.

`select` decides from (recipe, device type, compute capability, backend) alone: float8 GEMMs on CUDA 8.9+
(Ada, Hopper, Blackwell); on CPU torchao's emulation (each float8 GEMM replaced by a matmul of the dequantised
operands, so the casts, scales and gradients are exactly the float8 path's and only the GEMM kernel differs);
everything else is a one-line ConfigError naming `parallel.float8` and the device.

`convert` runs on the model as built (meta or materialised), before activation checkpointing, compile and
fully_shard wrap its layers, as torchtitan does: the checkpoint wrapper and the compiled layer then contain
the float8 linears, and fully_shard sees the weights' float8 all-gather hooks. Converted are the decoder
layers' nn.Linear whose in and out features are multiples of 16 (the float8 GEMMs' constraint); `lm_head` and
the embeddings stay in high precision (the most sensitive matmuls, as in torchtitan and Megatron).

The parameters keep their names and their high-precision values: a checkpoint or HF export of a float8 run
holds the same keys as any other run's (`plain_state_dict` unwraps torchao's weight wrappers), so a run
resumes with or without float8 and exports load in plain transformers. MFU stays against the dense bf16 peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from lemur_torch.errors import ConfigError

KEY = "parallel.float8"
RECIPES = ("none", "tensorwise", "rowwise", "mxfp8")
FLOAT8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x)
MXFP8_CAPABILITY = (10, 0)  # MX block-scaled GEMMs: Blackwell (B200/GB200/B300)
DIM_MULTIPLE = 16  # torch._scaled_mm: both dimensions of a float8 operand must be multiples of 16
HIGH_PRECISION = ("lm_head",)  # linears kept in high precision whatever their shape


@dataclass(frozen=True)
class Float8Plan:
    """What `parallel.float8` means on this process. `emulate`: the float8 GEMMs run as dequantised matmuls."""

    recipe: str = "none"
    emulate: bool = False
    device: str = ""  # how the start-of-run line names where the GEMMs run

    @property
    def enabled(self) -> bool:
        return self.recipe != "none"


def select(
    recipe: str,
    device_type: str,
    capability: Optional[Tuple[int, int]] = None,
    backend: str = "fsdp",
    device_name: str = "",
) -> Float8Plan:
    """Resolve `parallel.float8` for (recipe, device type, CUDA compute capability, parallel backend).

    Every impossible combination is a ConfigError naming the key and the device; `none` is always possible.
    """
    if recipe not in RECIPES:
        raise ConfigError(KEY, f"unknown float8 recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    if recipe == "none":
        return Float8Plan()
    if backend == "xla_spmd":
        raise ConfigError(
            KEY,
            f"{recipe} is not available with parallel.backend=xla_spmd (no float8 matmuls on TPU v4, and no "
            "torchao float8 path under torch_xla); set parallel.float8=none",
        )
    if device_type == "cpu":
        if recipe == "mxfp8":
            raise ConfigError(
                KEY,
                "mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200); this process runs on CPU: "
                "use tensorwise or rowwise (emulated on CPU) or none",
            )
        return Float8Plan(recipe, emulate=True, device="CPU")
    if device_type != "cuda":
        raise ConfigError(KEY, f"{recipe} needs an NVIDIA GPU or the CPU emulation; this process runs on {device_type}")
    name = device_name or "this GPU"
    cap = tuple(capability or (0, 0))
    where = f"{name} (sm_{cap[0]}{cap[1]})"
    if recipe == "mxfp8" and cap < MXFP8_CAPABILITY:
        raise ConfigError(
            KEY,
            f"mxfp8 needs a Blackwell GPU (compute capability 10.x, e.g. B200); {where} has none: use tensorwise "
            "or rowwise",
        )
    if cap < FLOAT8_CAPABILITY:
        raise ConfigError(
            KEY,
            f"{recipe} needs float8 tensor cores (compute capability 8.9+: L4/L40, H100/H200, B200); {where} "
            "has none: set parallel.float8=none",
        )
    return Float8Plan(recipe, emulate=False, device=where)


def select_for_device(recipe: str, device: torch.device, backend: str = "fsdp") -> Float8Plan:
    """`select` with the facts of `device` (its CUDA capability and name read here)."""
    if device.type == "cuda":
        return select(
            recipe,
            "cuda",
            torch.cuda.get_device_capability(device),
            backend,
            torch.cuda.get_device_name(device),
        )
    return select(recipe, device.type, None, backend)


def eligible(module: nn.Module, fqn: str) -> bool:
    """torchao's module filter: an nn.Linear outside HIGH_PRECISION whose in and out features are multiples of
    DIM_MULTIPLE. The embeddings are no nn.Linear, so they are never converted."""
    if not isinstance(module, nn.Linear) or isinstance(module, _converted_types()):
        return False
    if fqn.rsplit(".", 1)[-1] in HIGH_PRECISION:  # wrappers (AC, compile) add segments before the leaf only
        return False
    return module.in_features % DIM_MULTIPLE == 0 and module.out_features % DIM_MULTIPLE == 0


@dataclass
class Float8Conversion:
    """The result of `convert`: counts for the start-of-run line and the test that every eligible linear was
    converted, and the hook the training loop calls after each optimizer step."""

    plan: Float8Plan
    converted: int = 0  # modules that run float8 GEMMs now (counted on the converted model)
    eligible: int = 0  # modules the filter accepted
    linears: int = 0  # every nn.Linear of the model before conversion, lm_head included
    all_gather: bool = False  # tensorwise weights are all-gathered in float8 by FSDP2
    precompute: Optional[Callable[[nn.Module], None]] = None

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Run after every optimizer step (skipped or not): with the float8 all-gather, compute the next
        forward's weight scales for all layers in one all-reduce (torchao's
        precompute_float8_dynamic_scale_for_fsdp), instead of one amax all-reduce per layer inside the
        forward. No host synchronisation. A no-op for every other recipe."""
        if self.precompute is not None:
            self.precompute(model)

    def describe(self) -> str:
        """One line for the start-of-run summary, e.g. "float8 rowwise (emulated on CPU): 28 of 28 eligible
        linears; lm_head and embeddings in high precision"."""
        if not self.plan.enabled:
            return "none (high-precision matmuls)"
        how = "emulated on" if self.plan.emulate else "float8 GEMMs on"
        gather = ", float8 all-gather" if self.all_gather else ""
        rest = f"{self.converted} of {self.eligible} eligible linears"
        others = self.linears - self.eligible - len(HIGH_PRECISION)
        if others > 0:
            rest += f" ({others} with dimensions not multiples of {DIM_MULTIPLE} left in high precision)"
        kept = "lm_head and embeddings in high precision"
        return f"float8 {self.plan.recipe}{gather} ({how} {self.plan.device}): {rest}; {kept}"


def convert(model: nn.Module, plan: Float8Plan, all_gather: bool = True) -> Float8Conversion:
    """Convert the eligible linears of `model` (a HF LlamaForCausalLM, meta or materialised) in place.

    Call it before activation checkpointing, compile and fully_shard. `all_gather`: the layers will be
    sharded by fully_shard (tensorwise then all-gathers float8 weights); False on one process without
    sharding, where the weight wrapper would only cost a copy per step."""
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    if not plan.enabled:
        return Float8Conversion(plan, linears=linears)
    names = set()

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = eligible(module, fqn)
        if ok:
            names.add(fqn)
        return ok

    ao = _torchao()
    gather = all_gather and plan.recipe == "tensorwise"
    precompute = None
    if plan.recipe == "mxfp8":
        from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
        from torchao.quantization import quantize_  # lazy as torchao.float8 (_torchao)

        recipe = MXFP8TrainingRecipe.MXFP8_EMULATED_RCEIL if plan.emulate else MXFP8TrainingRecipe.MXFP8_RCEIL
        quantize_(model, MXFP8TrainingOpConfig.from_recipe(recipe), filter_fn=keep)
    else:
        config = dataclasses.replace(
            ao.Float8LinearConfig.from_recipe_name(plan.recipe),
            emulate=plan.emulate,
            enable_fsdp_float8_all_gather=gather,
        )
        if plan.recipe == "rowwise":
            from torch._inductor import config as inductor_config

            # as torchtitan, process-wide: inductor otherwise fuses the rowwise scales' casts at a higher precision
            # than eager runs them (pytorch#150859), so compiled and eager float8 values would differ
            inductor_config.emulate_precision_casts = True
        ao.convert_to_float8_training(model, config=config, module_filter_fn=keep)
        if gather:
            precompute = ao.precompute_float8_dynamic_scale_for_fsdp
    converted = sum(_is_converted(m) for m in model.modules())
    return Float8Conversion(plan, converted, len(names), linears, gather, precompute)


def plain_state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """`state` with torchao's weight wrappers (tensorwise's float8 all-gather weight, mxfp8's weight) replaced
    by the plain high-precision tensors they hold, DTensors kept as DTensors: what checkpoints and exports
    write. Values that are not wrapped come back as they are (no copy)."""
    return {k: unwrap_weight(v) for k, v in state.items()}


def unwrap_weight(value: Any) -> Any:
    """One value of a state dict without torchao's weight wrapper (see `plain_state_dict`)."""
    if not isinstance(value, torch.Tensor):
        return value
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value.to_local()
        inner = _inner(local)
        if inner is local:
            return value
        return DTensor.from_local(
            inner, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    return _inner(value)


def _inner(tensor: torch.Tensor) -> torch.Tensor:
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor
    for attr in ("_tensor", "_data"):  # WeightWithDynamicFloat8CastTensor, MXFP8TrainingWeightWrapperTensor
        inner = getattr(tensor, attr, None)
        if isinstance(inner, torch.Tensor) and inner.dtype == tensor.dtype and inner.shape == tensor.shape:
            return inner
    return tensor


def _is_converted(module: nn.Module) -> bool:
    if isinstance(module, _converted_types()):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and type(weight).__name__.startswith("MXFP8Training")


def _converted_types() -> tuple:
    import sys

    module = sys.modules.get("torchao.float8.float8_linear")  # never imported just to answer "no"
    return (module.Float8Linear,) if module is not None else ()


def _torchao():
    """torchao.float8, imported on first use: torchao is an optional extra (`lemur-torch[float8]`, in `gpu` and
    `dev`) that the TPU environment (torch 2.9) must not import, and its import costs ~1.6 s (CPU)."""
    try:
        import torchao.float8 as ao  # optional and heavy: see the docstring
    except ImportError as exc:
        raise ConfigError(
            KEY,
            f"float8 training needs torchao ({exc}): pip install 'lemur-torch[float8]', or set parallel.float8=none",
        ) from None
    return ao
