"""Config schema (dataclasses registered in Hydra's ConfigStore), composition and validation.

The YAML tree in conf/ holds the values; these dataclasses hold the types: a setting with a fixed set of
values is an Enum (lemur_torch.fields.Choice), a number with a range carries its bounds (`bounded`).
Composition rejects unknown keys, wrong types and unknown choices; `validate` checks every bound and rejects
impossible combinations. Both raise ConfigError, whose message is one line naming the offending key, before
any model is built. The inputs a config names (data files, tokenizer, weights, checkpoints) are checked next,
by lemur_torch.preflight.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lemur_torch.data.schema import DataConfig, SourceConfig  # noqa: F401  (re-exported)
from lemur_torch.errors import ConfigError
from lemur_torch.fields import Choice, bounded, check_bounds

# -- choices: one Enum per setting, its members the accepted values ---------------------------------------


class Attention(Choice):
    """lemur_torch.attention: every implementation is given the batch's document boundaries."""

    auto = "auto"  # flash on CUDA where a varlen kernel runs in the run's precision, else sdpa
    sdpa = "sdpa"  # torch SDPA with a per-document mask; the CPU default
    flex = "flex"  # FlexAttention with a block-sparse document mask (CUDA: no CPU backward)
    flash = "flash"  # varlen flash attention (flash-attn, else torch.nn.attention.varlen); CUDA, bf16/fp16
    xla_flash = "xla_flash"  # Pallas flash attention, parallel.backend=xla_spmd on TPU


class ParallelBackend(Choice):
    fsdp = "fsdp"  # FSDP2 over a DeviceMesh; also the single-process path
    xla_spmd = "xla_spmd"  # torch_xla SPMD FSDPv2


class MixedPrecision(Choice):
    auto = "auto"  # bf16 params + fp32 reduce on accelerators, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class ActivationCheckpointing(Choice):
    none = "none"
    full = "full"
    every_n = "every_n"  # every `ac_every_n`-th decoder layer


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"


class OptimImplementation(Choice):
    auto = "auto"  # fused on CUDA, foreach elsewhere
    fused = "fused"
    foreach = "foreach"
    for_loop = "for_loop"


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


# auto: async on CUDA, none elsewhere. Built with the functional API: OmegaConf looks members up by name, and
# "async" is a Python keyword, so it cannot be written as a class attribute
AsyncMode = Choice("AsyncMode", [(m, m) for m in ("auto", "none", "async", "async_pinned")])


class CommitMode(Choice):
    rename = "rename"  # POSIX: write into .tmp-<name>, rename into place
    marker = "marker"  # object stores, gcsfuse: write in place, the completion marker last


class ExportDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


_GT0 = dict(gt=0)
_POS = dict(ge=1)


@dataclass
class ModelConfig:
    name: str = "tiny"
    # exact HF LlamaConfig fields
    vocab_size: int = bounded(32000, **_POS)
    hidden_size: int = bounded(128, **_POS)
    intermediate_size: int = bounded(352, **_POS)
    num_hidden_layers: int = bounded(4, **_POS)
    num_attention_heads: int = bounded(4, **_POS)
    num_key_value_heads: int = bounded(2, **_POS)
    max_position_embeddings: int = bounded(4096, **_POS)
    rms_norm_eps: float = bounded(1e-5, **_GT0)
    rope_theta: float = bounded(10000.0, **_GT0)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = bounded(0.02, **_GT0)
    # HF folder (or hub id) to load weights from; null = random init with `train.seed`
    pretrained: Optional[str] = None
    attention: Attention = Attention.auto


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = bounded(3e-4, gt=0)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = bounded(1e-5, gt=0)
    weight_decay: float = bounded(0.1, ge=0)
    warmup_steps: int = bounded(10, ge=0)
    schedule: Schedule = Schedule.cosine
    # final lr = min_lr_ratio * lr
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    # steps over which the cosine decays; null = train.max_steps
    decay_steps: Optional[int] = bounded(None, ge=1)
    implementation: OptimImplementation = OptimImplementation.auto


@dataclass
class ParallelConfig:
    backend: ParallelBackend = ParallelBackend.fsdp
    # HSDP: replicate groups x shard group; dp_shard=-1 means world_size / dp_replicate
    dp_replicate: int = bounded(1, ge=1)
    dp_shard: int = bounded(-1, ge=-1)
    mixed_precision: MixedPrecision = MixedPrecision.auto
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.none
    ac_every_n: int = bounded(2, ge=1)
    compile: bool = False
    reshard_after_forward: bool = True
    # xla_spmd: mesh is (fsdp, tensor); tensor axis size
    xla_tensor: int = bounded(1, ge=1)
    # xla_spmd: run the decoder layers as one torch_xla scan (trace/compile time independent of depth)
    scan_layers: bool = False
    # xla_spmd: persistent compilation cache folder (per host); null = compile on every start
    xla_cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    seed: int = bounded(1234, ge=0)
    # >= 2: a row needs a token to predict and one to predict it from
    seq_len: int = bounded(256, ge=2)
    micro_batch_size: int = bounded(4, ge=1)
    # tokens per optimizer step over all data-parallel ranks
    global_batch_tokens: int = bounded(2048, ge=1)
    max_steps: int = bounded(300, ge=1)
    # max global grad norm; 0 would zero every gradient and a negative value flip them
    grad_clip: float = bounded(
        1.0, gt=0, hint="it is the max global grad norm (1.0 in Lemur); a huge value such as 1e9 turns clipping off"
    )
    # consecutive steps with a non-finite loss or grad norm before the run aborts
    max_nonfinite_steps: int = bounded(5, ge=1, hint="it counts consecutive skipped steps before the run aborts")
    # sequence chunk for the fp32 cross-entropy (bounds the fp32 logits memory)
    loss_chunk: int = bounded(1024, ge=1, hint="it is the sequence chunk of the fp32 cross-entropy (e.g. 1024)")
    # stop (with a checkpoint) after this step even though the schedule runs to max_steps: time-boxed
    # jobs, and resume tests; null = run to max_steps
    stop_at_step: Optional[int] = bounded(None, ge=1)
    # exit status after a preemption signal (SIGTERM/SIGUSR1) was honoured with a checkpoint; 0, 2 and 3 mean
    # done, config error and non-finite abort
    preempt_exit_code: int = bounded(124, ge=1, le=255)
    # step watchdog (lemur_torch/watchdog.py): a process whose loop makes no progress for this long (one step
    # with its data wait and its checkpoint's blocking part; the first step includes compilation) dumps every
    # thread's stack and exits with hang_exit_code, so the job restarts; null = no watchdog
    hang_timeout_s: Optional[float] = bounded(None, gt=0, hint="null turns the watchdog off")
    hang_exit_code: int = bounded(125, ge=1, le=255)


@dataclass
class CheckpointConfig:
    dir: str = "${run_dir}/checkpoints"
    # 0: only at the end (checkpoint.save_at_end) and on a stop signal
    every_steps: int = bounded(100, ge=0)
    keep_last: int = bounded(3, ge=1)
    # auto: resume from the newest complete checkpoint in `dir` (the last one committed); none: start fresh
    # (a new lineage: older checkpoints in `dir` are kept, never pruned); or a checkpoint path
    resume: str = "auto"
    # none: training waits for the write | async: staged to host memory, written in the background by DCP's
    # async_save | async_pinned: staged into reused pinned buffers (CUDA) in the background, overlapping the next
    # forward/backward | auto: async on CUDA, none elsewhere (a CPU run's state is small and its background
    # write would compete with training for the same cores)
    async_mode: AsyncMode = AsyncMode.auto
    # rename: write into .tmp-step_X, rename into place (POSIX) | marker: write in place, meta.json last
    # (object stores, gcsfuse: no atomic folder rename). A folder without meta.json is never a checkpoint.
    commit: CommitMode = CommitMode.rename
    save_at_end: bool = True
    export_dir: Optional[str] = "${run_dir}/hf"
    export_at_end: bool = True
    max_shard_size_mb: int = bounded(2000, ge=1)
    export_dtype: ExportDtype = ExportDtype.float32


@dataclass
class LogConfig:
    every_steps: int = bounded(1, ge=1, hint="log every n-th step (1 = every step)")
    console: bool = True
    wandb_mode: WandbMode = WandbMode.offline
    wandb_project: str = "lemur-torch"
    wandb_dir: str = "${run_dir}"
    # auto: look the device up in metrics.PEAK_FLOPS; or a number (FLOP/s per device)
    peak_flops: str = "auto"


@dataclass
class ValidationConfig:
    # the `eval` node: validation during training (lemur_torch/validation.py); lemur-eval, the benchmarks of an
    # export, has its own schema (lemur_torch/eval/config.py, conf/lemur_eval.yaml). Evaluate the held-out slices
    # of the training sources
    # (data.holdout, data.sources.<name>.holdout) and eval.sources every this many optimizer steps and after the
    # last step; 0 = never
    every_steps: int = bounded(0, ge=0, hint="0 turns validation off")
    # validation batches per source, each of train.global_batch_tokens tokens (one optimizer step's tokens, forward
    # only: about a third of a step's compute); a source with less held-out data is evaluated on what it has
    batches: int = bounded(4, ge=1)
    # separate validation sources (the data.sources schema; weight unused), read whole in path order
    sources: Dict[str, SourceConfig] = field(default_factory=dict)


@dataclass
class Config:
    run_name: str = "smoke"
    run_dir: str = "outputs/${run_name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: ValidationConfig = field(default_factory=ValidationConfig)


ConfigStore.instance().store(name="lemur_schema", node=Config)


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides against the schema; errors are ConfigError."""
    overrides = list(overrides or [])
    for override in overrides:
        _check_override_syntax(override)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="lemur_torch.conf", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra's and OmegaConf's errors, turned into one line naming the key
        raise composition_error(exc, overrides) from None
    return cfg


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").strip() or override


def _check_override_syntax(override: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_override(override)
    except Exception as exc:  # OverrideParseException: ANTLR's message, over several lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith("See https")]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise ConfigError(
            _override_key(override), f"cannot parse the override {override!r} ({detail}); write key=value"
        ) from None


def _full_key(key: str, overrides: List[str]) -> str:
    """OmegaConf names a node added by an override relative to its parent ('more' for +data.sources.more=...):
    the override's own key says where it is."""
    for override in overrides:
        parts = _override_key(override).split(".")
        if "." not in key and key in parts[1:]:
            return ".".join(parts[: parts.index(key, 1) + 1])
    return key


def composition_error(exc: BaseException, overrides: List[str]) -> ConfigError:
    """The key and a one-line message for an error Hydra or OmegaConf raised while composing the config.

    Hydra wraps OmegaConf's error, which knows the full key, in its own ("Error merging override
    train.seq_len=abc"): the chain is searched for it first."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        return ConfigError(
            group or option, f"no option {option!r} in conf/{group}/; available: {', '.join(sorted(exc.options))}"
        )
    cause: Optional[BaseException] = exc
    while cause is not None:
        key = getattr(cause, "full_key", None)
        if isinstance(cause, OmegaConfBaseException) and key:
            key, first = _full_key(str(key), overrides), str(cause).splitlines()[0]
            if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
                return ConfigError(
                    key,
                    f"no such key ({first}); check the spelling (`lemur-train --cfg` prints the "
                    "composed config), or add a new entry with +key=value",
                )
            if "is not a subclass of" in first and "." in key:
                # OmegaConf cannot add an entry to a typed mapping (data.sources) key by key; a merge can
                parent, _, name = key.rpartition(".")
                first += f"; add the entry by merging it: ++{parent}={{{name}: {{...}}}}"
            return ConfigError(key, first)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    # no key attached (e.g. an interpolation that does not resolve): the override the message mentions
    for override in overrides:
        key, _, value = override.partition("=")
        quoted = [part for i, part in enumerate(text.split("'")) if i % 2]
        if _override_key(key) in quoted or any(q and q in value for q in quoted):
            return ConfigError(_override_key(override), text)
    quoted = [part for i, part in enumerate(text.split("'")) if i % 2]
    return ConfigError(quoted[0] if quoted else "overrides", text)


def xla_tpu_available() -> bool:
    if importlib.util.find_spec("torch_xla") is None:
        return False
    import torch_xla.runtime as xr

    return xr.device_type() == "TPU"


def validate(cfg: DictConfig, world_size: int) -> None:
    """Check every value's range (schema bounds) and reject impossible combinations; called before any model
    is built. The inputs the config names (files, tokenizer, checkpoints) are checked by lemur_torch.preflight."""
    check_bounds(cfg, Config, "", ConfigError)
    t, m, o = cfg.train, cfg.model, cfg.optim
    if t.preempt_exit_code in (2, 3):
        raise ConfigError(
            "train.preempt_exit_code",
            f"{t.preempt_exit_code} already means a config error (2) or a non-finite "
            "abort (3); the job script must tell a preemption apart: use e.g. 124",
        )
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError(
            "train.seq_len", f"{t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    dp = data_parallel_size(cfg, world_size)
    per_micro = t.micro_batch_size * t.seq_len * dp
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            "train.global_batch_tokens",
            f"{t.global_batch_tokens} is not divisible by micro_batch_size x seq_len x data-parallel size "
            f"= {t.micro_batch_size} x {t.seq_len} x {dp} = {per_micro}",
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            "model.num_attention_heads", f"hidden_size {m.hidden_size} does not divide by {m.num_attention_heads} heads"
        )
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            "model.num_key_value_heads",
            f"{m.num_attention_heads} attention heads do not divide by {m.num_key_value_heads} kv heads",
        )
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(
            "model.num_attention_heads",
            f"head size {m.hidden_size // m.num_attention_heads} is odd; rotary embeddings need an even one",
        )
    validate_attention(cfg)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", f"needs two values in [0, 1), got {list(o.betas)}; Lemur uses [0.9, 0.95]")
    peak = cfg.log.peak_flops
    if peak != "auto" and not _positive_number(peak):
        raise ConfigError(
            "log.peak_flops",
            f"{peak!r} is neither auto nor a number; give the device's peak FLOP/s, e.g. 989e12 for an H100 SXM",
        )
    from transformers.activations import ACT2FN  # last: the first transformers import costs a second or two

    if m.hidden_act not in ACT2FN:
        raise ConfigError("model.hidden_act", f"unknown activation {m.hidden_act!r}; Llama uses silu")


def _positive_number(text: str) -> bool:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value > 0


def validate_attention(cfg: DictConfig) -> None:
    """model.attention against this machine: the kernel must exist here and run in the run's precision."""
    import torch

    from lemur_torch.attention import select

    p = cfg.parallel
    if p.backend == ParallelBackend.xla_spmd:
        if cfg.model.attention == Attention.xla_flash and not xla_tpu_available():
            raise ConfigError("model.attention", "xla_flash (Pallas) runs only with parallel.backend=xla_spmd on a TPU")
        select(str(cfg.model.attention), str(p.backend), "xla", torch.float32)
        return
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = p.mixed_precision == MixedPrecision.bf16 or (
        p.mixed_precision == MixedPrecision.auto and device_type == "cuda"
    )
    select(str(cfg.model.attention), str(p.backend), device_type, torch.bfloat16 if bf16 else torch.float32)


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    p = cfg.parallel
    if p.backend == "xla_spmd":
        return 1  # one process per host feeds a global batch that SPMD shards over devices
    replicate = p.dp_replicate
    shard = world_size // replicate if p.dp_shard == -1 else p.dp_shard
    if replicate < 1 or shard < 1 or replicate * shard != world_size:
        raise ConfigError(
            "parallel.dp_shard",
            f"dp_replicate x dp_shard = {replicate} x {p.dp_shard} does not match world size {world_size}",
        )
    return world_size


def grad_accum_steps(cfg: DictConfig, dp_size: int) -> int:
    t = cfg.train
    return t.global_batch_tokens // (t.micro_batch_size * t.seq_len * dp_size)
