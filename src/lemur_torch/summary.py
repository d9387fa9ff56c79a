"""The start-of-run summary: what this run is, in one block, printed by rank 0 before the first step.

Model and parameter count, processes and mesh, the attention kernel in use, float8 (what it converted, where
its GEMMs run), the batch arithmetic, the planner's prediction for this configuration on these devices
(lemur_torch.plan.run.predict_run), each data source with its share and size, the checkpoint folder, and where
the run starts (fresh or resumed). Built from the objects the run actually uses (the built model, backend and
loader), not from the config alone, so what it says is what runs.
"""

from __future__ import annotations

from typing import List, Optional

from omegaconf import DictConfig


def run_summary(
    cfg: DictConfig,
    backend,
    model,
    loader,
    grad_accum: int,
    step: int,
    tokens_seen: int,
    resumed_from: Optional[str],
    prediction: str = "",
) -> str:
    t, m = cfg.train, cfg.model
    rows: List[tuple] = [
        (
            "model",
            f"{m.name}: {_class_name(model)}, {short_count(_num_params(model))} parameters "
            f"({m.num_hidden_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
            f"{m.num_key_value_heads} kv heads, vocab {m.vocab_size})"
            + (f", from {m.pretrained}" if m.pretrained else ""),
        ),
        (
            "processes",
            f"{backend.name} on {backend.world_size} process(es), {backend.num_devices} {backend.device_kind} "
            f"device(s); mesh {describe_mesh(getattr(backend, 'mesh', None))}; data-parallel {backend.dp_size}",
        ),
        ("attention", getattr(backend, "attention", "") or attention_kernel(model, m.attention)),
        *([("float8", backend.float8)] if getattr(backend, "float8", "") else []),
        (
            "batch",
            f"{t.micro_batch_size} rows x {t.seq_len} tokens x {backend.dp_size} data-parallel x {grad_accum} "
            f"micro-batch(es) = {t.global_batch_tokens:,} tokens/step; {t.max_steps:,} steps = "
            f"{t.max_steps * t.global_batch_tokens:,} tokens",
        ),
    ]
    if prediction:
        rows.append(("plan", prediction))
    rows += [
        (
            "data",
            f"{cfg.data.name} ({cfg.data.format}, tokenizer {cfg.data.tokenizer}{_tokens(loader)}), "
            f"{getattr(loader, 'lanes', '?')} lanes, {getattr(loader, 'num_workers', '?')} worker(s) per rank",
        ),
    ]
    rows += [("", line) for line in source_lines(loader)]
    c = cfg.checkpoint
    when = f"every {c.every_steps} steps" if c.every_steps else "at the end"
    rows.append(
        (
            "checkpoints",
            f"{c.dir}, {when}, keep {c.keep_last}"
            + (f"; HF export to {c.export_dir}" if c.export_at_end and c.export_dir else ""),
        )
    )
    if resumed_from:
        rows.append(
            (
                "resume",
                f"from {resumed_from} at step {step:,} ({tokens_seen:,} tokens seen); "
                f"{max(t.max_steps - step, 0):,} steps to go",
            )
        )
    else:
        why = "checkpoint.resume=none" if c.resume == "none" else f"no checkpoint in {c.dir}"
        rows.append(("resume", f"fresh start at step 0 ({why})"))
    width = max(len(k) for k, _ in rows)
    head = f"run {cfg.run_name} -> {cfg.run_dir}"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


def source_lines(loader) -> List[str]:
    """Per source: domain, weight and share of rows, then the data layer's own description (files, bytes, how
    lanes split it, expected read amplification; `PackedMixtureLoader.describe`, which also warns when a source's
    layout multiplies its reads)."""
    if not (hasattr(loader, "sources") and hasattr(loader, "schedule") and hasattr(loader, "describe")):
        return [f"  {type(loader).__name__} (no sources to describe)"]
    weights = list(loader.schedule.weights)
    total = sum(weights)
    out = []
    for src, w, line in zip(loader.sources, weights, loader.describe()):
        out.append(f"  {line}; domain {src.domain}, weight {src.weight:g} ({100 * w / total:.1f}% of rows)")
    return out


def describe_mesh(mesh) -> str:
    """`name=size x ...` of a torch DeviceMesh or a torch_xla SPMD Mesh."""
    if mesh is None:
        return "none"
    names = getattr(mesh, "mesh_dim_names", None) or getattr(mesh, "axis_names", None)
    shape = getattr(mesh, "mesh_shape", None)
    if shape is None and hasattr(mesh, "mesh"):
        shape = tuple(mesh.mesh.shape)
    if names and shape:
        return " x ".join(f"{n}={s}" for n, s in zip(names, shape))
    return str(shape or mesh)


def attention_kernel(model, configured) -> str:
    used = getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)
    used = str(used) if used is not None else str(configured)
    return used if used == str(configured) else f"{used} (model.attention={configured})"


def _tokens(loader) -> str:
    tokenizer = getattr(loader, "tokenizer", None)
    return f" of {len(tokenizer):,} tokens" if tokenizer is not None else ""


def _unwrap(model):
    # torch_xla's FSDPv2 and compile wrap the HF model; FSDP2 keeps its class
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module
    return model


def _class_name(model) -> str:
    # FSDP2 swaps the class for a generated subclass (FSDPLlamaForCausalLM): name the model's own class
    cls = type(_unwrap(model))
    return next((c.__name__ for c in cls.__mro__ if c.__module__.startswith("transformers")), cls.__name__)


def _num_params(model) -> int:
    # DTensor shards report their global numel; tied weights are counted once by parameters()
    return sum(p.numel() for p in model.parameters())


def short_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
