"""Entry point (`lemur-train [overrides]`): compose the config, build the parts, run Trainer.fit().

Works the same under a plain `python`, `torchrun`, `accelerate launch` and Slurm's `srun`: rank and world
size come from the environment. Exit status: 0 done, or the status of the error the run ended with, chosen by
its class (lemur_torch/errors.py: 2 a bad input, 3 non-finite, 4 a data source failed for good mid-run,
`train.preempt_exit_code` after a stop signal, `train.hang_exit_code` from the step watchdog).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from typing import List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import load_config, validate
from lemur_torch.data import build_loader
from lemur_torch.errors import InputError, LemurError, Preempted
from lemur_torch.export import export_model
from lemur_torch.metrics import MetricsLogger
from lemur_torch.optim import build_optimizer, build_scheduler
from lemur_torch.parallel import build_backend
from lemur_torch.preflight import check_inputs
from lemur_torch.tokenizer import build_tokenizer, check_vocab_size
from lemur_torch.trainer import StopSignal, Trainer
from lemur_torch.validation import build_validator


def build_and_fit(cfg: DictConfig) -> int:
    stop = StopSignal().install()  # first: a preemption warning may come while a 70B model loads
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)  # every RNG a checkpoint records starts from the run's seed
    backend = build_backend(cfg)
    logger = MetricsLogger(cfg, enabled=backend.is_main)
    try:
        tokenizer = build_tokenizer(cfg.data)  # a hub tokenizer is first fetched here
        check_vocab_size(tokenizer, cfg.model.vocab_size)
        loader = build_loader(
            cfg.data,
            tokenizer,
            cfg.train.seq_len,
            cfg.train.micro_batch_size,
            backend.dp_rank,
            backend.dp_size,
            cfg.train.seed,
        )
        validator = build_validator(cfg, loader, backend, logger.info)
        model = backend.setup_model(cfg)
        optimizer = build_optimizer(model, cfg.optim, backend.device.type)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        trainer = Trainer(
            cfg,
            backend,
            model,
            optimizer,
            scheduler,
            loader,
            Checkpointer(cfg, backend, logger.info),
            logger,
            stop,
            validator,
        )
        trainer.fit()  # raises Preempted after a stop signal
        if trainer.step >= cfg.train.max_steps and cfg.checkpoint.export_at_end and cfg.checkpoint.export_dir:
            out = export_model(backend, model, cfg, tokenizer, cfg.checkpoint.export_dir)
            logger.info(f"HF export written to {out}")
        return 0
    finally:
        logger.close()
        backend.shutdown()


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun, accelerate, srun via launch/); 0 alone."""
    return int(os.environ.get("RANK", "0"))


# how long a rank other than 0 waits, after hitting a problem every rank hits, for the launcher to stop it
FOLLOWER_WAIT_S = 30


def report(text: str, status: int) -> int:
    """End the run with one line on stderr, printed by rank 0, and `status`.

    A problem every rank finds (a bad input: all ranks check the same; a non-finite abort: all ranks see the
    same reduced loss) is printed once. The other ranks do not exit first: torchrun stops the whole group as
    soon as one process exits, which could stop rank 0 before it has printed. They wait to be stopped instead;
    one still running after FOLLOWER_WAIT_S found something rank 0 did not (a path missing on its node only, a
    bad record in its share of the data) and prints it itself."""
    rank = launch_rank()
    if rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # StopSignal may be installed: let the launcher stop us
        time.sleep(FOLLOWER_WAIT_S)
        text = f"[rank {rank}] {text}"
    print(text, file=sys.stderr, flush=True)
    return status


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: lemur-train [--cfg] [key=value ...]   e.g. experiment=smoke train.max_steps=20 parallel=hsdp")
        return 0
    show = "--cfg" in args
    args = [a for a in args if a != "--cfg"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The gate: everything checkable here is checked before the process group or any model exists
    try:
        cfg = load_config(args)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if not show:  # --cfg prints a config that names inputs of another machine (e.g. the 70B cluster's paths)
            check_inputs(cfg)
    except InputError as exc:
        return report(exc.one_line(), exc.exit_code)
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        return build_and_fit(cfg)
    except Preempted as exc:  # every rank got the signal's agreed stop: each exits, nothing to print
        return exc.exit_code
    # by class (errors.py): an input found once the process group exists (hub files, data listing, a refused
    # resume, a bad record with data.strict=true), a non-finite abort, a data source that failed for good
    except LemurError as exc:
        return report(exc.one_line(), exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
