"""The config schema: one Enum per setting with a fixed set of values, one dataclass per config group, the
whole tree registered in Hydra's ConfigStore as `lemur_schema` (conf/config.yaml names it as its base).

The YAML tree in conf/ holds the values; these dataclasses hold the types and the defaults: a setting with a
fixed set of values is an Enum (lemur_torch.fields.Choice), a number with a range carries its bounds
(`bounded`), which lemur_torch.config.validate checks. The `data:` group's schema is the data pipeline's own
(lemur_torch.data.schema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore

from lemur_torch.data.schema import DataConfig, SourceConfig
from lemur_torch.fields import Choice, bounded
from lemur_torch.plan.devices import DEVICES

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
    # op-level (torchtitan's policy): keep the outputs of every other matmul and of attention, recompute the rest
    selective = "selective"


class ReduceDtype(Choice):
    """The dtype FSDP2 reduce-scatters gradients in under bf16 mixed precision."""

    fp32 = "fp32"
    bf16 = "bf16"  # half the bytes on the network; each rank's sum of its share is rounded to bf16 once


class Float8(Choice):
    """lemur_torch.parallel.float8: torchao float8 training of the decoder layers' linears (FSDP backend)."""

    none = "none"
    tensorwise = "tensorwise"  # one scale per tensor; FSDP2 all-gathers the weights in float8
    rowwise = "rowwise"  # one scale per row (more accurate); weights travel in bf16
    mxfp8 = "mxfp8"  # 32-value blocks with power-of-two scales; Blackwell (compute capability 10.x) only


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"


class OptimImplementation(Choice):
    auto = "auto"  # fused with the FSDP backend (CPU and CUDA), capturable for_loop with torch_xla
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


# the accelerator kinds of the planner's device table (lemur_torch/plan/devices.py: datasheet figures, sources)
DeviceKind = Choice("DeviceKind", [(kind, kind) for kind in DEVICES])


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
    # false: the last decoder layer keeps its gathered parameters from forward to backward, which starts with it
    # (no re-gather; one layer's bf16 parameters more memory). Only with reshard_after_forward
    reshard_last_layer: bool = True
    # gradient reduce-scatter dtype under bf16 mixed precision (fp32 runs reduce in fp32)
    reduce_dtype: ReduceDtype = ReduceDtype.fp32
    # float8 matmuls through torchao (parallel/float8.py): emulated on CPU, float8 GEMMs on CUDA 8.9+; not xla_spmd
    float8: Float8 = Float8.none
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
class ClusterConfig:
    """The cluster a run is planned for (`lemur-plan`, and the start-of-run prediction). Null everywhere by default:
    a run is not planned, and the start-of-run summary predicts for the device and process count the backend finds;
    `lemur-plan` needs `cluster.device` and `cluster.devices`."""

    # null: not planned (the backend's own device, where the device table knows it)
    device: Optional[DeviceKind] = None
    # accelerators (GPUs or TPU chips) of the run; null: the backend's count
    devices: Optional[int] = bounded(None, ge=1, hint="the number of accelerators (GPUs or TPU chips) the run uses")
    # null: the device kind's (8 GPUs per node, 4 TPU v4/v5p or 8 v5e/v6e chips per host)
    devices_per_node: Optional[int] = bounded(None, ge=1)
    # network per device, Gbit/s (TPU: ICI per chip); null: the device kind's
    inter_node_gbps: Optional[float] = bounded(None, gt=0, hint="Gbit/s per device, e.g. 400 for 8 x 400G NICs")
    # NVLink per device and direction, Gbit/s (TPU: ICI); null: the device kind's
    intra_node_gbps: Optional[float] = bounded(None, gt=0)
    # usable memory per device, GiB; null: the device kind's
    memory_gib: Optional[float] = bounded(None, gt=0)


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


ConfigStore.instance().store(name="lemur_schema", node=Config)
