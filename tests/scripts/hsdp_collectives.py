"""Run under torchrun with 4 processes (gloo): HSDP over a 2 x 2 mesh (replicate x shard), one optimizer step's
gradient accumulation over 2 micro-batches per rank through the backend's prepare_backward.

Counts, per micro-batch backward, the collectives FSDP2 issues on each mesh dimension (torch.distributed's
all_reduce and reduce_scatter_single wrapped), and checks the accumulated gradients against a plain
single-process model on rank 0 that sees all 8 micro-batches. Rank 0 writes the result as JSON to --out.
"""

import argparse
import json

import torch
import torch.distributed as dist

from lemur_torch.attention import forward_kwargs
from lemur_torch.batch import document_lengths
from lemur_torch.config import load_config
from lemur_torch.model import build_meta_model, token_loss_sums
from lemur_torch.parallel.fsdp import FsdpBackend

MICRO, B, S = 2, 2, 32


def micro_batch(rank: int, i: int):
    g = torch.Generator().manual_seed(100 * rank + i)
    ids = torch.randint(3, 32000, (B, S), generator=g)
    pos = torch.cat([torch.arange(11), torch.arange(S - 11)]).expand(B, S).contiguous()
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": pos,
        "doc_lens": document_lengths(pos),
        "domain_ids": torch.zeros_like(ids),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(
        [
            "model=tiny",
            "parallel=hsdp",
            "parallel.dp_replicate=2",
            "parallel.mixed_precision=fp32",
            "parallel.activation_checkpointing=none",
        ]
    )
    backend = FsdpBackend(cfg)
    model = backend.setup_model(cfg)
    groups = {name: dist.get_process_group_ranks(backend.mesh.get_group(name)) for name in ("dp_replicate", "dp_shard")}
    full_weights = {n: p.full_tensor() for n, p in model.named_parameters()}

    counts = []
    real = {"all_reduce": dist.all_reduce, "reduce_scatter_single": dist.reduce_scatter_single}

    def counting(op):
        def wrapped(*a, group=None, **kw):
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            dim = next((name for name, r in groups.items() if r == ranks), "world")
            counts[-1][f"{op}/{dim}"] = counts[-1].get(f"{op}/{dim}", 0) + 1
            return real[op](*a, group=group, **kw)

        return wrapped

    dist.all_reduce, dist.reduce_scatter_single = counting("all_reduce"), counting("reduce_scatter_single")
    world = dist.get_world_size()
    total = float(world * MICRO * B * (S - 1))
    batches = backend.device_batches(micro_batch(backend.rank, i) for i in range(MICRO))
    for i, mb in enumerate(batches):
        backend.prepare_backward(model, i, MICRO)
        counts.append({})
        logits = model(**forward_kwargs(mb)).logits
        loss, _, _ = token_loss_sums(logits, mb["labels"], mb["domain_ids"], 1, 1024)
        (loss / total).backward()
    dist.all_reduce, dist.reduce_scatter_single = real["all_reduce"], real["reduce_scatter_single"]
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}

    if backend.rank == 0:
        ref = build_meta_model(cfg.model)
        ref.to_empty(device="cpu")
        from lemur_torch.model import reset_rope_buffers

        reset_rope_buffers(ref, torch.device("cpu"))
        ref.load_state_dict(full_weights)
        for r in range(world):
            for i in range(MICRO):
                mb = micro_batch(r, i)
                logits = ref(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
                loss, _, _ = token_loss_sums(logits, mb["labels"], mb["domain_ids"], 1, 1024)
                (loss / total).backward()
        err = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in ref.named_parameters())
        with open(args.out, "w") as f:
            json.dump({"counts": counts, "max_rel_grad_err": err, "groups": groups}, f)
    backend.shutdown()


if __name__ == "__main__":
    main()
