"""Entry point (`lemur-train [overrides]`): compose the config, build the parts, run Trainer.fit().

Works the same under a plain `python`, `torchrun`, `accelerate launch` and Slurm's `srun`: rank and world
size come from the environment. Exit status: 0 done, 2 config error, 3 aborted on non-finite steps, `train.preempt_exit_code` after a
preemption signal was honoured with a checkpoint (the job script requeues on it).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch.config import ConfigError, load_config, validate


def build_and_fit(cfg: DictConfig) -> int:
    from lemur_torch.checkpoint import Checkpointer
    from lemur_torch.data import build_loader
    from lemur_torch.export import export_model
    from lemur_torch.metrics import MetricsLogger
    from lemur_torch.optim import build_optimizer, build_scheduler
    from lemur_torch.parallel import build_backend
    from lemur_torch.tokenizer import build_tokenizer
    from lemur_torch.trainer import StopSignal, Trainer

    stop = StopSignal().install()  # first: a preemption warning may come while a 70B model loads
    torch.manual_seed(cfg.train.seed)
    backend = build_backend(cfg)
    logger = MetricsLogger(cfg, enabled=backend.is_main)
    try:
        tokenizer = build_tokenizer(cfg.data)
        if len(tokenizer) > cfg.model.vocab_size:
            raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        loader = build_loader(cfg.data, tokenizer, cfg.train.seq_len, cfg.train.micro_batch_size,
                              backend.dp_rank, backend.dp_size, cfg.train.seed)
        model = backend.setup_model(cfg)
        logger.info(f"attention: {backend.attention}")
        optimizer = build_optimizer(model, cfg.optim, backend.device.type)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        trainer = Trainer(cfg, backend, model, optimizer, scheduler, loader, Checkpointer(cfg, backend), logger, stop)
        status = trainer.fit()
        if status == 0 and trainer.step >= cfg.train.max_steps and cfg.checkpoint.export_at_end and cfg.checkpoint.export_dir:
            out = export_model(backend, model, cfg, tokenizer, cfg.checkpoint.export_dir)
            logger.info(f"HF export written to {out}")
        return status
    finally:
        logger.close()
        backend.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: lemur-train [--cfg] [key=value ...]   e.g. experiment=smoke train.max_steps=20 parallel=hsdp")
        return 0
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from lemur_torch.trainer import NonFiniteError

    try:
        return build_and_fit(cfg)
    except NonFiniteError as exc:
        print(f"aborted: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:  # found while building (e.g. tokenizer vs vocabulary, pretrained config)
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
