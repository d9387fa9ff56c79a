"""Memory per device, by component, at the moment of the step that needs the most.

What the step holds, as the code keeps it (bytes; T = tokens of a micro-batch on the device):
- state: fp32 parameters, fp32 gradients and the two AdamW moments, each the device's padded FSDP2 shard
  (the whole model in one unsharded process, where gradients appear layer by layer during backward);
- gathered layers: FSDP2 all-gathers a layer's bf16 parameters into a flat buffer and copies them out into the
  unsharded parameters, while the layer before runs (current + prefetched, the prefetched one briefly twice);
  in backward the layer's unsharded bf16 gradients too, and its reduce-scatter input in the reduce dtype (kept
  until that collective finishes, so the previous layer's is still there);
- the root group (embedding, final norm, lm_head) stays gathered from its forward to the end of backward
  (reshard_after_forward=False), and lm_head's unsharded gradient waits there for the root's reduce-scatter;
- saved activations per layer (HF LlamaDecoderLayer, as autograd keeps them; checked by counting the storages
  its saved-tensor hooks see): each RMSNorm keeps an fp32 copy of its input, the normalised value and its
  output in the compute dtype; attention keeps q, k, v after RoPE, its output and the fp32 log-sum-exp (the
  CPU SDPA path also a [B, 1, S, S] mask per layer, and K/V expanded to all heads); the SwiGLU MLP keeps
  gate, silu(gate), up and their product (a GELU MLP: up and gelu(up)). Full checkpointing keeps a layer's
  input only and recomputes the rest of one layer at a time in backward; `every_n` does so for every n-th
  layer; `selective` (torchtitan's op-level policy) keeps the layer input, the outputs of every other matmul
  (q, v, gate, down: the 1st, 3rd, ... of each layer) and attention's output;
- logits and loss: the compute-dtype logits stay referenced by the trainer until the step ends;
  token_loss_sums (lemur_torch.model.ChunkedCrossEntropy) keeps nothing of its own beyond an fp32 [B, S]
  log-sum-exp: its forward makes one chunk's fp32 copy (and logsumexp's temporary) at a time, its backward one
  chunk's fp32 softmax at a time, written into the logits' gradient (compute dtype, whole); a loss over an fp32
  copy of all logits (torchtitan, llm-foundry) keeps log_softmax's fp32 output and needs two more fp32 copies
  in backward;
- runtime overhead, outside the allocator's count: CUDA context and kernels (~0.6 GiB with CUDA 12's lazy
  module loading) and NCCL's communicators (NCCL_BUFFSIZE 4 MiB per channel and peer, ~1 GiB at scale); and
  the caching allocator's fragmentation, 5% of its peak (what torch.cuda.max_memory_reserved exceeds
  max_memory_allocated by in steady-state FSDP training with expandable segments off). TPU: none counted;
- the XLA backend: FSDPv2 gathers each layer's fp32 master weights (autocast casts inside the matmuls); its
  residual stream stays fp32; with `parallel.xla_tensor` = t > 1 a device gathers 1/t of each layer's
  projections, keeps 1/t of attention's and the MLP's activations but the whole norms and residual stream, for
  its rows times t (the t devices of a tensor group share rows); `scan_layers` adds the stacked copy of the
  layers' weights and, in backward, their stacked gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from lemur_torch.plan.setting import Setting
from lemur_torch.plan.shape import ModelShape

GIB = 2**30
CUDA_CONTEXT_BYTES = 0.6 * GIB
NCCL_BYTES = 1.0 * GIB
FRAGMENTATION = 0.05


@dataclass
class MemoryEstimate:
    components: Dict[str, float]  # bytes at the peak moment
    moment: str  # which moment of the step the peak is
    allocated: float  # what the caching allocator counts (torch.cuda.max_memory_allocated's analogue)
    reserved: float  # allocated plus fragmentation (max_memory_reserved's analogue: torchtitan's "memory")
    peak: float  # reserved plus the runtime's own memory: what must fit in the device

    def gib(self) -> Dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in self.components.items()}


def mm_outputs(shape: ModelShape) -> List[int]:
    """Per-token widths of a layer's matmul outputs, in execution order."""
    mlp = [shape.ffn] * (shape.ffn_matrices - 1) + [shape.hidden]
    return [shape.q_dim, shape.kv_dim, shape.kv_dim, shape.hidden] + mlp


def layer_saved_bytes(shape: ModelShape, s: Setting) -> float:
    """Bytes per token one layer keeps for backward without checkpointing (XLA's tensor axis splits attention's
    heads and the MLP's features over its devices; the norms and the residual stream are whole on each)."""
    a, h, q, f = s.act_bytes, shape.hidden, shape.q_dim, shape.ffn
    kv = q if s.attention == "sdpa" else shape.kv_dim  # the CPU SDPA path expands K/V to every head
    norm = (a * h if s.fused_norm else 4 * h + a * h) + a * h + 4
    attn = a * (2 * q + 2 * kv) + 4 * shape.heads + (a * s.seq_len if s.attention == "sdpa" else 0)
    mlp = a * f * (4 if shape.ffn_matrices == 3 else 2)
    return 2 * norm + (attn + mlp) / s.tensor


def layer_input_bytes(shape: ModelShape, s: Setting) -> float:
    # under xla autocast the residual stream stays fp32; FSDP2 mixed precision runs it in bf16
    return (4 if s.backend == "xla_spmd" else s.act_bytes) * shape.hidden


def selective_saved_bytes(shape: ModelShape, s: Setting) -> float:
    a = s.act_bytes
    kept = sum(width for i, width in enumerate(mm_outputs(shape)) if i % 2 == 0)
    return layer_input_bytes(shape, s) + a * kept + a * shape.q_dim + 4 * shape.heads


def checkpointed_layers(shape: ModelShape, s: Setting) -> int:
    if s.ac == "full" or s.ac == "selective":
        return shape.layers
    if s.ac == "every_n":
        return -(-shape.layers // s.ac_every_n)
    return 0


def saved_per_layer(shape: ModelShape, s: Setting) -> List[float]:
    """Bytes per token each layer keeps between its forward and its backward."""
    full, ckpt = layer_saved_bytes(shape, s), layer_input_bytes(shape, s)
    if s.ac == "selective":
        return [selective_saved_bytes(shape, s)] * shape.layers
    if s.ac == "full":
        return [ckpt] * shape.layers
    if s.ac == "every_n":
        return [ckpt if i % s.ac_every_n == 0 else full for i in range(shape.layers)]
    return [full] * shape.layers


def backward_transient_bytes(shape: ModelShape, s: Setting) -> float:
    """Per token, the gradients alive on top of a layer's activations inside its backward, at the worst: the
    incoming and outgoing residual gradients, and the MLP's one [T, ffn] gradient beyond what it frees (the
    product's gradient, then both factors' while the product itself is released) or attention's q/k/v ones."""
    a = s.act_bytes
    attn = a * (shape.q_dim + 2 * shape.kv_dim)
    return max(a * shape.ffn, attn) / s.tensor + 2 * a * shape.hidden


def global_saved_bytes(shape: ModelShape, s: Setting) -> float:
    """Per token, what the model keeps once outside its layers: the final norm and RoPE's cos/sin."""
    a, h = s.act_bytes, shape.hidden
    return 4 * h + 2 * a * h + 4 + 2 * a * shape.head_size


def loss_bytes(shape: ModelShape, s: Setting) -> Tuple[float, float]:
    """(held through backward, peak of the loss's forward+backward) in bytes for one micro-batch."""
    a, tv = s.act_bytes, s.device_tokens * shape.vocab
    held = a * tv  # the logits the trainer still references
    if s.loss == "fused":  # compiled cross-entropy: the logits and, in backward, their gradient
        return held, 2 * held
    if s.loss == "fp32_cross_entropy":
        # bf16 logits + log_softmax's saved fp32 output + nll's and log_softmax's fp32 input gradients
        return held, held + 12 * tv
    chunk = min(s.loss_chunk, s.seq_len) * s.micro_batch * s.tensor * shape.vocab
    # forward: a chunk's fp32 copy (a view of fp32 logits) and logsumexp's fp32 temporary; backward: the logits'
    # gradient and one chunk's fp32 softmax
    forward = held + (4 if a != 4 else 0) * chunk + 4 * chunk
    backward = 2 * held + 4 * chunk
    return held, max(forward, backward)


def estimate(shape: ModelShape, s: Setting, local_params: int, cuda_runtime: bool, devices: int) -> MemoryEstimate:
    """Peak memory per device: the largest of the step's moments (the loss's backward, each layer's backward,
    the optimizer step), with its components. `cuda_runtime`: add the CUDA context, NCCL and the allocator's
    fragmentation (GPUs); `devices`: how many take part (NCCL's buffers exist only with more than one)."""
    T = s.device_tokens
    p4 = 4.0 * local_params
    state = {"params": p4, "optimizer": 2 * p4}
    saved = [b * T for b in saved_per_layer(shape, s)]
    full_layer = layer_saved_bytes(shape, s) * T
    held_logits, loss_peak = loss_bytes(shape, s)
    global_saved = global_saved_bytes(shape, s) * T
    gpu = cuda_runtime
    # gathered parameters and gradients of FSDP (XLA gathers in the compute dtype's master, fp32)
    # a device gathers its tensor-axis share of each layer's projections (all of it on a 1-D mesh)
    layer_p = shape.layer_matmul_params / s.tensor + 2 * shape.hidden
    gathered_bytes = 2 if s.backend == "fsdp" else 4
    if s.float8_all_gather:
        gathered_bytes = 1 + (gathered_bytes - 1) * (2 * shape.hidden / max(layer_p, 1))
    reduce_bytes = 4 if s.reduce_dtype == "fp32" else 2
    sharded = s.sharded and s.backend == "fsdp"
    root_gathered = 2.0 * shape.root_params if sharded else (4.0 * shape.root_params if s.backend != "fsdp" else 0)
    lm_head_grad = 2.0 * shape.vocab * shape.hidden if sharded else 0.0
    kept_layers = shape.layers if not s.reshard_after_forward else (0 if s.reshard_last else 1)
    gathered_fwd = gathered_bytes * layer_p * (3 + kept_layers) if s.sharded else 0.0
    gathered_bwd = gathered_bytes * layer_p * (3 + max(kept_layers - 1, 0)) + 2.0 * layer_p if s.sharded else 0.0
    rs = 2 * reduce_bytes * layer_p if sharded else 0.0
    grads_full = 4.0 * shape.total_params if not s.sharded else 0.0
    grads_sharded = p4 if s.sharded else 0.0
    # scan_layers stacks the layers' (sharded) weights for the loop, and their gradients come back stacked
    stack = 4.0 * local_params * shape.layers * shape.layer_params / shape.total_params if s.scan_layers else 0.0

    moments: List[Tuple[str, Dict[str, float]]] = []
    moments.append(
        (
            "loss backward",
            {
                **state,
                "grads": grads_sharded,
                "gathered_layers": gathered_fwd,
                "root_gathered": root_gathered,
                "activations": sum(saved) + global_saved,
                "logits": loss_peak,
                "scan_stacks": stack,
            },
        )
    )
    layer_grad = 4.0 * shape.layer_params
    transient = backward_transient_bytes(shape, s) * T
    grads_above = 4.0 * (shape.vocab * shape.hidden + shape.hidden) if not s.sharded else 0.0
    below = sum(saved)
    for i in reversed(range(shape.layers)):
        below -= saved[i]
        # a checkpointed layer's backward recomputes its whole forward set (selective: all but what it kept)
        recomputed = full_layer - (saved[i] - layer_input_bytes(shape, s) * T if s.ac == "selective" else 0.0)
        recomputed = recomputed if saved[i] < full_layer else 0.0
        moments.append(
            (
                f"backward of layer {i}",
                {
                    **state,
                    "grads": grads_sharded + lm_head_grad + (grads_above + layer_grad if not s.sharded else 0.0),
                    "gathered_layers": gathered_bwd,
                    "root_gathered": root_gathered,
                    "reduce_scatter": rs,
                    "activations": below + saved[i],
                    "recompute": recomputed + transient,
                    "logits": held_logits,
                    "scan_stacks": 2 * stack,
                },
            )
        )
        grads_above += layer_grad if not s.sharded else 0.0
    optimizer_temp = p4 if s.optimizer_foreach else 0.0
    moments.append(
        (
            "optimizer step",
            {
                **state,
                "grads": grads_sharded + grads_full,
                "optimizer_temporaries": optimizer_temp,
                "logits": held_logits,
            },
        )
    )
    moment, components = max(moments, key=lambda m: sum(m[1].values()))
    components = {k: v for k, v in components.items() if v}
    allocated = sum(components.values())
    reserved = allocated * (1 + FRAGMENTATION) if gpu else allocated
    if gpu:
        components["fragmentation"] = reserved - allocated
        components["runtime"] = CUDA_CONTEXT_BYTES + (NCCL_BYTES if devices > 1 else 0.0)
    peak = sum(components.values())
    return MemoryEstimate(components, moment, allocated, reserved, peak)
