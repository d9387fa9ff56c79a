"""A run's settings as the planner reads them: batch split, checkpointing policy, precision, sharding, compile.

`Setting.from_config` reads them off the run's composed config (train.*, parallel.*) for a given cluster; the
search varies them with `dataclasses.replace`. Two fields describe how a trainer implements its step rather
than how it is configured, so that published runs of other trainers can be described too: `loss` (this
project's chunked fp32 loss, or a cross-entropy over an fp32 copy of all the logits, as torchtitan and
llm-foundry compute it) and `fused_norm` (a norm that runs as one kernel even without compile, e.g. MPT's
LayerNorm; HF's RMSNorm is six eager ops).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from omegaconf import DictConfig

from lemur_torch.errors import ConfigError
from lemur_torch.plan.cluster import Cluster

AC_POLICIES = ("none", "full", "every_n", "selective")


@dataclass(frozen=True)
class Setting:
    seq_len: int
    micro_batch: int  # rows per device per micro-batch
    grad_accum: int
    backend: str = "fsdp"  # fsdp | xla_spmd
    ac: str = "full"  # none | full | every_n | selective
    ac_every_n: int = 2
    param_dtype: str = "bf16"  # bf16: FSDP2 mixed precision (xla: autocast over fp32 weights) | fp32
    reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype
    reshard_after_forward: bool = True
    reshard_last: bool = True  # the last layer reshards after forward too (backward starts with it)
    compile: bool = False
    float8: bool = False  # the decoder's linears in float8 (torchao), lm_head and embeddings in bf16
    float8_recipe: str = "tensorwise"  # with float8: tensorwise (weights all-gathered in float8) | rowwise | mxfp8
    loss_chunk: int = 1024
    loss: str = "chunked"  # chunked (lemur_torch.model.token_loss_sums) | fp32_cross_entropy
    attention: str = "flash"  # flash (no mask, K/V not expanded) | sdpa (CPU: a [B,1,S,S] mask, K/V expanded)
    fused_norm: bool = False
    dp_replicate: int = 1  # HSDP replicas (the shard group is devices / dp_replicate)
    tensor: int = 1  # xla_spmd: the mesh's tensor axis (Megatron-style projections split over it)
    scan_layers: bool = False  # xla_spmd: the layers run as one scan over their stacked weights
    sharded: bool = True  # fully_shard applied (not for one fp32 process: parallel/fsdp.py)
    optimizer_foreach: bool = False  # foreach AdamW (a temporary per parameter) rather than fused

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def device_tokens(self) -> int:
        """Tokens a device's layers run per micro-batch: its rows, times the XLA tensor axis (a tensor group's
        devices share their rows and split the work on them)."""
        return self.tokens_per_micro_batch * self.tensor

    @property
    def act_bytes(self) -> int:
        return 2 if self.param_dtype == "bf16" else 4

    @property
    def float8_all_gather(self) -> bool:
        """FSDP2 all-gathers the float8 weights (tensorwise); rowwise and mxfp8 gather them in bf16."""
        return self.float8 and self.float8_recipe == "tensorwise"

    def shard_size(self, devices: int) -> int:
        return devices // self.dp_replicate

    def describe(self) -> str:
        ac = f"every_{self.ac_every_n}" if self.ac == "every_n" else self.ac
        parts = [f"micro_batch {self.micro_batch} x grad_accum {self.grad_accum}", f"AC {ac}"]
        if self.dp_replicate > 1:
            parts.append(f"HSDP {self.dp_replicate} replicas")
        if self.tensor > 1:
            parts.append(f"tensor {self.tensor}")
        if self.scan_layers:
            parts.append("scan_layers")
        if self.backend == "fsdp":
            parts.append(f"reduce {self.reduce_dtype}")
            if not self.reshard_last:
                parts.append("last layer kept")
        parts += ["compile"] * self.compile + [f"float8 {self.float8_recipe}"] * self.float8
        return ", ".join(parts)

    @classmethod
    def from_config(cls, cfg: DictConfig, cluster: Cluster) -> "Setting":
        """The run's settings on `cluster`: per-device rows and accumulation steps as the backends derive them
        (FSDP: every device is a data-parallel rank; xla_spmd: train.micro_batch_size rows per host, spread
        over the host's devices)."""
        t, p = cfg.train, cfg.parallel
        n = cluster.devices
        if p.backend == "xla_spmd":
            per_host = cluster.devices_per_node
            if t.micro_batch_size % per_host:
                raise ConfigError(
                    "train.micro_batch_size",
                    f"{t.micro_batch_size} rows per host do not divide over the host's {per_host} devices",
                )
            micro = t.micro_batch_size // per_host
        else:
            micro = t.micro_batch_size
        per_step = micro * t.seq_len * n
        if t.global_batch_tokens % per_step:
            raise ConfigError(
                "train.global_batch_tokens",
                f"{t.global_batch_tokens} is not divisible by {micro} rows x {t.seq_len} tokens x {n} devices "
                f"= {per_step}: pick train.micro_batch_size so that it is, or another cluster.devices",
            )
        replicate = 1
        if p.backend == "fsdp":
            replicate = int(p.dp_replicate)
            shard = n // replicate if p.dp_shard == -1 else int(p.dp_shard)
            if replicate * shard != n:
                raise ConfigError(
                    "parallel.dp_shard",
                    f"dp_replicate x dp_shard = {replicate} x {p.dp_shard} does not match cluster.devices={n}",
                )
        elif n % p.xla_tensor:
            raise ConfigError("parallel.xla_tensor", f"{p.xla_tensor} does not divide the {n} devices")
        bf16 = p.mixed_precision in ("bf16", "auto")
        xla = p.backend == "xla_spmd"
        reshard = bool(p.reshard_after_forward)
        recipe = str(p.get("float8", "none"))
        return cls(
            seq_len=int(t.seq_len),
            micro_batch=int(micro),
            grad_accum=int(t.global_batch_tokens // per_step),
            backend=str(p.backend),
            ac=str(p.activation_checkpointing),
            ac_every_n=int(p.ac_every_n),
            param_dtype="bf16" if bf16 else "fp32",
            reduce_dtype=str(p.reduce_dtype) if bf16 and not xla else "fp32",
            reshard_after_forward=reshard,
            reshard_last=reshard and bool(p.reshard_last_layer),
            compile=bool(p.compile) or xla,
            float8=recipe != "none",
            float8_recipe=recipe if recipe != "none" else "tensorwise",
            loss_chunk=int(t.loss_chunk),
            dp_replicate=int(replicate),
            tensor=int(p.xla_tensor) if xla else 1,
            scan_layers=bool(p.scan_layers) and xla,
            sharded=n > 1 or bf16,
        )

    def replace(self, **changes) -> "Setting":
        return dataclasses.replace(self, **changes)
