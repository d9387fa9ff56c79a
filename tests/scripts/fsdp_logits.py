"""Run under torchrun: build the FSDP2 model (weights from an HF folder or a lemur-torch checkpoint), write its
logits on a fixed batch to --out-logits (rank 0), and optionally export it to an HF folder."""

import argparse

import torch
from omegaconf import OmegaConf

from lemur_torch.config import load_config
from lemur_torch.export import export_model
from lemur_torch.parallel.fsdp import FsdpBackend


def fixed_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 32000, (2, 40), generator=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained")
    ap.add_argument("--checkpoint")
    ap.add_argument("--export")
    ap.add_argument("--out-logits", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.checkpoint:
        cfg = OmegaConf.load(f"{args.checkpoint}/config.yaml")
    else:
        cfg = load_config(["model=tiny", f"model.pretrained={args.pretrained}", *args.overrides])
    backend = FsdpBackend(cfg)
    model = backend.setup_model(cfg, init_weights=args.checkpoint is None)
    if args.checkpoint:
        state = backend.state_dict_for_checkpoint(model, None)
        backend.dcp_load(state, args.checkpoint)
        backend.load_state_dict_from_checkpoint(model, None, state)
    with torch.no_grad():
        logits = model(input_ids=fixed_batch(), use_cache=False).logits
    if backend.is_main:
        torch.save(logits, args.out_logits)
    if args.export:
        export_model(backend, model, cfg, None, args.export)
    backend.shutdown()


if __name__ == "__main__":
    main()
