"""Step time per device: the work a step executes, at the rates the device kind reaches, and the FSDP traffic
that compute cannot hide.

Compute, per micro-batch and layer:
- matmuls (the layer's projections; lm_head once): 2*T*K*N FLOPs forward, twice that backward, plus what the
  checkpointing policy recomputes; each timed by the roofline, max(FLOPs / (peak * matmul_fraction), bytes /
  (HBM * bandwidth_fraction)), so narrow layers are limited by their operands' traffic. float8 runs the
  decoder's linears at the fp8 peak (twice bf16's) at the kind's fp8 MAMF, plus the casts' traffic, for every
  recipe alike; tensorwise also all-gathers those weights in float8 (rowwise and mxfp8 gather bf16);
- attention as flash kernels execute it: 4*B*S^2*q_dim/2 FLOPs forward with causal masking (the blocks above
  the diagonal are skipped), 2.5 times that backward (FlashAttention-2's count), at `attention_fraction`;
- the elementwise ops (norms, RoPE, residual adds, SwiGLU, layout copies, the loss over the vocabulary), as
  the bytes they read and write: eager PyTorch runs each op as its own pass over HBM (HF's RMSNorm alone is six,
  with an fp32 copy), torch.compile fuses each layer's into a few passes (XLA always does), backward moves about
  twice the forward's bytes;
- FSDP2's copies: all-gather copy-out of every gathered layer, the gradients' cast into the reduce-scatter
  buffer; and the optimizer: AdamW and gradient clipping stream the local shard's 40 bytes per parameter.

XLA's tensor axis (`parallel.xla_tensor` = t): a device runs its tensor group's rows (t times its own) through
1/t of each projection and of the heads, and all-reduces attention's and the MLP's outputs over the group
(Megatron-style: 2 per layer forward, 2 backward), with nothing to hide them behind.

Communication: ring all-gather and reduce-scatter over the shard group, (n-1)/n of the layer's bytes at the
bus bandwidth of the slowest link the group crosses: NVLink inside a node (NCCL reaches ~80% of it), the
node's NICs together across nodes (~90%: 183 of 200 GB/s for 1 GB all-gathers on 2 x 8 H100 with 8 x 200 Gb/s,
NVIDIA dgxc-benchmarking), never more than NVLink; TPU ICI at ~85%; plus a latency per collective of 20 us
and 8 us per node it spans (NCCL's ring: a network hop per node). HSDP reduce-scatters inside the shard
group each micro-batch and all-reduces across replicas (one NIC per device) once per step.
Overlap (FSDP2's prefetching; XLA's latency-hiding scheduler is taken to do the same): layer i+1's all-gather
runs under layer i's forward, in backward layer i-1's all-gather and layer i+1's reduce-scatter under layer
i's backward; what exceeds the compute beside it is exposed, and so are the first all-gather (root and
layer 0) and the last reduce-scatter of every micro-batch.

Host: eager PyTorch dispatches ~10 us per op (50 per layer forward, twice that backward; FSDP2's hooks
~0.3 ms per layer and micro-batch); a compiled layer launches a fifth as many kernels. The device runs
behind the host, so a micro-batch takes the longer of the two. Per step: 30 ms (the trainer's host sync on
the finite check before the optimizer step, the loss all-reduce, the metrics read one step late).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from lemur_torch.plan.cluster import Cluster
from lemur_torch.plan.memory import checkpointed_layers
from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape

NVLINK_EFFICIENCY = 0.80
NETWORK_EFFICIENCY = 0.90
ICI_EFFICIENCY = 0.85
LATENCY_S = 20e-6
LATENCY_PER_NODE_S = 8e-6
CAUSAL_BLOCK = 128
COMM_SM_SHARE = 0.15
OP_DISPATCH_S = 10e-6
FSDP_HOOKS_S = 0.3e-3
STEP_FIXED_S = 0.03
# token_loss_sums per vocabulary entry of a token: forward the fp32 copy and logsumexp's passes (18); backward the
# fp32 copy, the in-place subtract, exp and scale, the cast into the gradient (34)
LOSS_BYTES_PER_VOCAB = 52
FUSED_LOSS_BYTES_PER_VOCAB = 8  # a compiled cross-entropy: reads the bf16 logits twice, writes their gradient


@dataclass
class TimeEstimate:
    step_s: float
    parts: Dict[str, float] = field(default_factory=dict)  # seconds per step, by kind
    bottleneck: str = "compute"


def layer_matmuls(shape: ModelShape, tensor: int = 1) -> List[Tuple[int, int]]:
    """(in, out) features of each of a layer's linear projections on one device: XLA's tensor axis splits q, k,
    v, gate and up by output and o and down by input features."""
    h, q, kv, f = shape.hidden, shape.q_dim // tensor, shape.kv_dim // tensor, shape.ffn // tensor
    return [(h, q), (h, kv), (h, kv), (q, h)] + [(h, f)] * (shape.ffn_matrices - 1) + [(f, h)]


class Rates:
    """The device's rates in the units the costs use."""

    def __init__(self, cluster: Cluster, s: Setting):
        d = cluster.device
        self.peak = d.peak_flops
        self.mm = self.peak * d.matmul_fraction
        self.fp8 = 2 * self.peak * d.fp8_matmul_fraction if (s.float8 and d.fp8_matmul_fraction) else self.mm
        self.attn = self.peak * d.attention_fraction
        self.hbm = d.hbm_gbs * 1e9 * d.bandwidth_fraction

    def matmul(self, tokens: int, k: int, n: int, a: int, fp8: bool = False) -> float:
        flops = 2.0 * tokens * k * n
        data = (1 if fp8 else a) * (tokens * k + k * n) + a * tokens * n
        return max(flops / (self.fp8 if fp8 else self.mm), data / self.hbm)


def elementwise_bytes(shape: ModelShape, s: Setting) -> float:
    """Bytes per token one layer's elementwise ops move in its forward (eager or compiled)."""
    t = s.tensor
    a, h, q, kv, f = s.act_bytes, shape.hidden, shape.q_dim // t, shape.kv_dim // t, shape.ffn // t
    swiglu = shape.ffn_matrices == 3
    if s.compile or s.backend == "xla_spmd":
        # residual add fused into the norm; RoPE fused with the layout copy; the MLP's activation one pass
        return 2 * (4 * a * h) + 2 * a * (q + kv) + (3 if swiglu else 2) * a * f
    norm = 2 * a * h if s.fused_norm else (28 + 4 * a) * h
    return 2 * norm + 2 * 3 * a * h + 12 * a * (q + kv) + (5 if swiglu else 2) * a * f


def recompute_fraction(shape: ModelShape, s: Setting) -> float:
    """Share of the layers whose forward runs again in backward (XLA: rematerialised like full)."""
    if s.ac in ("full", "every_n"):
        return checkpointed_layers(shape, s) / shape.layers
    return 0.0


def comm_bandwidth(cluster: Cluster, group: int, one_per_node: bool = False) -> float:
    """Bus bandwidth (bytes/s) of a ring over `group` devices."""
    d = cluster.device
    if d.tpu:
        return cluster.inter_node_gbps / 8 * 1e9 * ICI_EFFICIENCY
    nvlink = cluster.intra_node_gbps / 8 * 1e9 * NVLINK_EFFICIENCY
    if one_per_node:
        return min(nvlink, cluster.inter_node_gbps / 8 * 1e9 * NETWORK_EFFICIENCY)
    if group <= cluster.devices_per_node:
        return nvlink
    return min(nvlink, cluster.devices_per_node * cluster.inter_node_gbps / 8 * 1e9 * NETWORK_EFFICIENCY)


def ring_time(nbytes: float, group: int, bandwidth: float, nodes: int) -> float:
    if group <= 1:
        return 0.0
    return LATENCY_S + LATENCY_PER_NODE_S * nodes + nbytes * (group - 1) / group / bandwidth


def estimate(shape: ModelShape, s: Setting, cluster: Cluster, local_params: int) -> TimeEstimate:
    r = Rates(cluster, s)
    T, a, L, t = s.device_tokens, s.act_bytes, shape.layers, s.tensor
    fp8 = s.float8 and cluster.device.fp8_matmul_fraction is not None
    matmuls = layer_matmuls(shape, t)
    mm_fwd = sum(r.matmul(T, k, n, a, fp8) for k, n in matmuls)
    causal = 0.5 + CAUSAL_BLOCK / (2 * s.seq_len)
    # a tensor group's rows, over its share of the heads
    attn_fwd = 4.0 * s.micro_batch * t * s.seq_len**2 * (shape.q_dim / t) * causal / r.attn
    elem_fwd = elementwise_bytes(shape, s) * T / r.hbm
    if fp8:
        casts = sum(k for k, _ in matmuls) + sum(n for _, n in matmuls)
        elem_fwd += (a + 1 if s.compile else 2 * a + 1) * casts * T / r.hbm
    redo = recompute_fraction(shape, s)
    # a recomputation stops once it has what the backward needs (torch's checkpoint stops early; XLA drops the
    # dead ops): no gradient needs the layer's last matmul's output, so that one is not run again
    mm_redo = redo * (mm_fwd - r.matmul(T, *matmuls[-1], a, fp8))
    if s.ac == "selective":  # the matmuls whose outputs are not kept: the 2nd, 4th, ... of each layer
        mm_redo = sum(r.matmul(T, k, n, a, fp8) for i, (k, n) in enumerate(matmuls) if i % 2 == 1)
    elem_redo = elem_fwd if s.ac == "selective" else redo * elem_fwd
    # FSDP traffic, per layer and micro-batch
    n_shard = s.shard_size(cluster.devices) // t
    sharded = s.sharded and n_shard > 1
    layer_p = shape.layer_matmul_params / t + 2 * shape.hidden  # a device's share of the layer (tensor axis)
    gathered = (2 if s.backend == "fsdp" else 4) * layer_p
    if fp8 and s.float8_all_gather:
        gathered = shape.layer_matmul_params / t + (gathered / layer_p) * 2 * shape.hidden
    reduced = (4 if s.reduce_dtype == "fp32" else 2) * layer_p
    nodes = min(cluster.nodes, -(-n_shard // cluster.devices_per_node))
    bw = comm_bandwidth(cluster, n_shard)
    ag = ring_time(gathered, n_shard, bw, nodes) if sharded else 0.0
    rs = ring_time(reduced, n_shard, bw, nodes) if sharded else 0.0
    root_ag = ring_time(shape.root_params * gathered / layer_p, n_shard, bw, nodes) if sharded else 0.0
    root_rs = ring_time(shape.root_params * reduced / layer_p, n_shard, bw, nodes) if sharded else 0.0
    # tensor axis: attention's and the MLP's outputs are all-reduced over the group in forward (2 per layer),
    # their inputs' gradients in backward (2), again in a recomputed forward; on the critical path
    allreduce = 2 * ring_time(a * T * shape.hidden, t, comm_bandwidth(cluster, t), 1) if t > 1 else 0.0
    tp_fwd, tp_bwd = 2 * allreduce, 2 * allreduce * (1 + recompute_fraction(shape, s))
    regather = s.reshard_after_forward
    copies = sharded and s.backend == "fsdp"  # XLA's collectives write in place
    copies_fwd = 2 * gathered / r.hbm if copies else 0.0  # all-gather copy-out: read the buffer, write params
    # the bf16 gradients cast into the reduce-scatter buffer, and the backward all-gather's copy-out
    copies_bwd = ((copies_fwd if regather else 0.0) + (2 * layer_p + reduced) / r.hbm) if copies else 0.0
    c_fwd = mm_fwd + attn_fwd + elem_fwd + copies_fwd + tp_fwd
    c_bwd = 2 * mm_fwd + 2.5 * attn_fwd + 2 * elem_fwd + mm_redo + redo * attn_fwd + elem_redo + copies_bwd + tp_bwd
    loss_bytes = (FUSED_LOSS_BYTES_PER_VOCAB if s.loss == "fused" else LOSS_BYTES_PER_VOCAB) * T * shape.vocab
    head = 3 * r.matmul(T, shape.hidden, shape.vocab, a) + loss_bytes / r.hbm
    bwd_comm = (ag if regather else 0.0) + rs
    # collectives running beside compute take SMs from it (GPUs; a TPU's ICI has its own DMA engines)
    share = 0.0 if cluster.device.tpu else COMM_SM_SHARE
    contention = share * (min(c_fwd, ag) + min(c_bwd, bwd_comm))
    gpu_micro = L * (c_fwd + c_bwd + contention) + head
    exposed = root_ag + ag + max(0.0, ag - c_fwd) * (L - 1)
    first_bwd_ag = ag if (regather and s.reshard_last) else 0.0
    exposed += max(0.0, first_bwd_ag - head)
    exposed += max(0.0, bwd_comm - c_bwd) * (L - 1) + rs + root_rs
    # host
    ops = 50 * (1 + 2 + redo + (1 if s.ac == "selective" else 0)) / (5 if s.compile else 1)
    host_micro = L * (ops * OP_DISPATCH_S + (FSDP_HOOKS_S if sharded else 0.0))
    if s.backend == "xla_spmd":
        host_micro = 0.0  # one compiled program per step
    micro = max(gpu_micro, host_micro)
    optimizer = 40.0 * local_params / r.hbm
    replicate_s = 0.0
    if s.dp_replicate > 1:
        rep_bw = comm_bandwidth(cluster, s.dp_replicate, one_per_node=True)
        per_layer = 2 * reduced / n_shard
        replicate_s = ring_time(per_layer, s.dp_replicate, rep_bw, s.dp_replicate)
        replicate_s = max(0.0, replicate_s * L - L * c_bwd) + 2 * replicate_s
    step = s.grad_accum * (micro + exposed) + optimizer + replicate_s + STEP_FIXED_S
    parts = {
        "matmul": s.grad_accum * (L * (3 * mm_fwd + mm_redo) + 3 * r.matmul(T, shape.hidden, shape.vocab, a)),
        "attention": s.grad_accum * L * (3.5 + redo) * attn_fwd,
        "elementwise": s.grad_accum * (L * (3 * elem_fwd + elem_redo) + loss_bytes / r.hbm),
        "fsdp_copies": s.grad_accum * L * (copies_fwd + copies_bwd),
        "comm_contention": s.grad_accum * L * contention,
        "tensor_parallel": s.grad_accum * L * (tp_fwd + tp_bwd),
        "host_bound": s.grad_accum * max(0.0, host_micro - gpu_micro),
        "exposed_communication": s.grad_accum * exposed + replicate_s,
        "communication_total": s.grad_accum * (root_ag + root_rs + L * (ag * (2 if regather else 1) + rs)),
        "optimizer": optimizer,
        "step_overhead": STEP_FIXED_S,
    }
    if parts["exposed_communication"] + parts["tensor_parallel"] > 0.25 * step:
        bottleneck = "communication"
    elif parts["host_bound"] > 0.25 * step:
        bottleneck = "host"
    else:
        bottleneck = "compute"
    return TimeEstimate(step, parts, bottleneck)
