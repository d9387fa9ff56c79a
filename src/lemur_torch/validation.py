"""Validation during training (`eval.*`): loss and perplexity on held-out data, per source and per domain.

What is evaluated: the held-out slice of each training source (`data.holdout`, `data.sources.<name>.holdout`:
a part of the source that training never reads, data/sources/base.py "Held-out slices") and each of
`eval.sources` (separate validation sources, read whole), packed into rows by the loader's own packer
(data/heldout.py): documents with BOS/EOS, a label -100 on each document's first token and per-document
positions, or, for chat runs, whole conversations with loss on assistant tokens only - the training rows'
rules exactly.

The validation set is a pure function of the config and the data - not of the world size, the training
progress or a resume - and is built once, at start:
- per source, R = eval.batches x train.global_batch_tokens / train.seq_len rows, shared among the
  `data.lanes` lanes of its held-out slice (cut as the training shares are, in natural order) in proportion to
  the data each lane holds. Lane v packs its rows from the start of its share and stops: reading stops there
  (bytes read ~ what is evaluated), and a lane that runs out pads its last row (no loss on the padding) and
  gives what it has, so a short slice is evaluated as it is and the start-up log says so. (With few rows per
  lane the rows lean towards the beginnings of documents; they are the same rows at every evaluation.)
- data-parallel rank r builds lanes v = r (mod ranks) of every source, so every lane is read by one rank.
Every rank runs the same number of forward micro-batches (micro_batch_size rows; ranks with fewer rows pad
with rows that carry no loss), and the per-source sums of token losses and label-token counts are all-reduced
once: loss = sum of token losses / label tokens, as for the training loss, so the values do not depend on
how the rows are spread over ranks.

An evaluation runs in eval mode under torch.no_grad, moves its batches with the backend's `device_batches` and
calls the model as the training step does (`attention.forward_kwargs`: the rows' document boundaries, `doc_lens`,
reach the attention kernel), and computes the loss with the same function (`model.token_loss_sums`). On XLA each
micro-batch is one graph (`backend.eval_step_done`), compiled at the first evaluation and reused; training
steps keep their one graph per step. Nothing here touches the training loader's stream or state, so the
training stream with evaluation equals the stream without it, and a resume is unaffected.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from lemur_torch.attention import forward_kwargs
from lemur_torch.batch import IGNORE_INDEX
from lemur_torch.data.heldout import apportion, narrow_reads, rank_rows
from lemur_torch.data.schema import SourceConfig, source_config
from lemur_torch.data.sources.base import Source
from lemur_torch.data.sources.listing import resolve_listing
from lemur_torch.errors import BadInputError, ConfigError, DataConfigError, DataReadError
from lemur_torch.model import token_loss_sums


def build_validator(cfg: DictConfig, loader, backend, info: Callable[[str], None] = print) -> Optional["Validator"]:
    """The run's Validator, or None when `eval.every_steps` is 0 or there is nothing to evaluate (said in one line:
    every run inherits the smoke experiment's validation, also one whose own sources hold nothing out).
    Collective: every rank calls it right after building the loader."""
    if not cfg.eval.every_steps:
        return None
    if not any(src.holdout for src in loader.sources) and not cfg.eval.sources:
        info(
            f"validation off: eval.every_steps={cfg.eval.every_steps}, but no source holds data out and "
            "eval.sources is "
            "empty; set data.holdout (or data.sources.<name>.holdout) or eval.sources to validate, or "
            "eval.every_steps=0"
        )
        return None
    return Validator(cfg, loader, backend, info)


class Validator:
    """The validation rows, built once at start (module docstring), and their evaluation: `due(step)` says
    when, `run(model, step)` evaluates and returns the metrics to log."""

    def __init__(self, cfg: DictConfig, loader, backend, info: Callable[[str], None] = print):
        e, t = cfg.eval, cfg.train
        t0 = time.perf_counter()
        self.every, self.max_steps = int(e.every_steps), int(t.max_steps)
        self.backend, self.loss_chunk = backend, int(t.loss_chunk)
        self.seq_len, self.micro = int(t.seq_len), int(t.micro_batch_size)
        sources = self._sources(cfg, loader, backend)
        self.sources = [s for s, _, _ in sources]  # their held-out readers
        self.names = [s.name for s, _, _ in sources]
        self.domain_of = [s.domain for s, _, _ in sources]
        self.domains = sorted(set(self.domain_of))
        self._check_names(cfg, loader)

        # rows of each (source, lane), lanes shared out over the data-parallel ranks
        lanes, ranks = loader.lanes, backend.dp_size
        self.requested = int(e.batches) * (int(t.global_batch_tokens) // self.seq_len)
        quotas = [apportion(self.requested, src.lane_weights(lanes)) for src, _, _ in sources]
        narrow_reads(self.sources, self.seq_len)  # read ~ what is evaluated
        capacity = [sum(q[v] for q in quotas for v in range(r, lanes, ranks)) for r in range(ranks)]
        self.micro_batches = -(-max(capacity) // self.micro)  # the same on every rank, without communication
        self.quotas = quotas
        n = len(sources)
        try:
            rows, ids, built, read = rank_rows(loader, self.sources, quotas, backend.dp_rank, ranks)
            failure = None
        except (DataReadError, BadInputError) as exc:  # told to every rank below, so that none waits for this one
            rows, ids, built, read, failure = [], [], [0] * n, [0] * n, f"{type(exc).__name__}: {exc}"
        gathered = loader.gather((built, read, failure))
        failures = [f for _, _, f in gathered if f is not None]
        if failures:
            raise DataConfigError(f"validation: building the validation rows failed: {failures[0]}")
        self.rows = [sum(g[0][s] for g in gathered) for s in range(n)]
        self.read_bytes = [sum(g[1][s] for g in gathered) for s in range(n)]
        pad = np.stack(
            [
                np.zeros(self.seq_len, np.int64),
                np.full(self.seq_len, IGNORE_INDEX, np.int64),
                np.arange(self.seq_len, dtype=np.int64),
            ]
        )
        # row source ids index the sources; padding rows get the extra id n (no labels)
        rows += [pad] * (self.micro_batches * self.micro - len(rows))
        ids += [n] * (len(rows) - len(ids))
        self.batches = [
            loader.collate(torch.from_numpy(np.stack(rows[i : i + self.micro])), ids[i : i + self.micro])
            for i in range(0, len(rows), self.micro)
        ]

        for (src, key, what), got in zip(sources, self.rows):
            if not got:
                raise DataConfigError(
                    f"validation: source {src.name!r} gives no validation rows from {what} ({key}): "
                    f"every record there is bad, or no record starts there; raise or fix {key}"
                )
        info(
            f"validation every {self.every} steps and at the end: {n} source(s), {sum(self.rows)} rows of "
            f"{self.seq_len} tokens, {self.micro_batches} forward micro-batch(es) per rank; built in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        for (src, key, what), got, nbytes in zip(sources, self.rows, self.read_bytes):
            short = (
                (
                    f": only {got} of the {self.requested} rows requested by eval.batches (a short held-out slice is "
                    "evaluated as it is)"
                )
                if got < self.requested
                else ""
            )
            info(
                f"validation source {src.name!r} ({src.domain}) from {what} ({key}): {got} rows, "
                f"{nbytes / 1e6:.1f} MB read{short}"
            )

    @staticmethod
    def _sources(cfg: DictConfig, loader, backend) -> List[Tuple[Source, str, str]]:
        """(reader, the setting it comes from, what it reads) per validation source: the training sources' held-out
        slices, then eval.sources."""
        out = [
            (src.held_out(), src.holdout_setting, f"the held-out {src.held_out_summary()}")
            for src in loader.sources
            if src.holdout
        ]
        extra = _eval_sources(cfg)
        if extra:
            listings, error = {}, None
            if backend.rank == 0:  # listed once, as the loader lists the training sources
                try:
                    for name, scfg in extra.items():
                        listings[str(name)] = resolve_listing(str(name), scfg, loader.text_column(scfg), loader.storage)
                except DataConfigError as exc:
                    error = exc
            listings, error = backend.broadcast_object((listings, error))
            if error is not None:
                raise DataConfigError(f"eval.sources: {error}") from None
            for name, scfg in extra.items():
                src = loader.build_source(str(name), scfg, listings.get(str(name)))
                out.append((src.held_out(whole=True), f"eval.sources.{name}", "the whole source"))
        if not out:
            raise ConfigError(
                "eval.every_steps",
                "there is nothing to evaluate: no source holds data out (data.holdout, "
                "data.sources.<name>.holdout) and eval.sources is empty",
            )
        return out

    def _check_names(self, cfg: DictConfig, loader) -> None:
        # val/loss/<name> is logged for sources and domains alike: one name must not mean two things
        train = {s.name for s in loader.sources}
        extra = set(_eval_sources(cfg))
        for name in sorted(extra & train):
            raise ConfigError(
                f"eval.sources.{name}",
                "has the name of a training source; rename it (metrics are logged per source name)",
            )
        for name in self.names:
            if name in self.domains and [n for n, d in zip(self.names, self.domain_of) if d == name] != [name]:
                key = f"eval.sources.{name}" if name in extra else f"data.sources.{name}"
                raise ConfigError(
                    key,
                    f"a validation source named like the domain {name!r}, which has "
                    f"other sources: val/loss/{name} would mean two things; rename the source",
                )

    # -- evaluation ----------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def run(self, model, step: int) -> Dict[str, Any]:
        """Evaluate the model (every rank, collectively); returns the metrics to log for this step."""
        t0 = time.perf_counter()
        b, n = self.backend, len(self.names)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                acc = None
                for batch in b.device_batches(iter(self.batches)):
                    logits = model(**forward_kwargs(batch)).logits  # as the training step: per-document attention
                    _, loss_sum, count = token_loss_sums(
                        logits, batch["labels"], batch["domain_ids"], n + 1, self.loss_chunk
                    )
                    src = batch["domain_ids"][:, 0]
                    rows = torch.zeros(n + 1, dtype=torch.float32, device=src.device).index_add_(
                        0, src, torch.ones(src.shape, dtype=torch.float32, device=src.device)
                    )
                    part = torch.cat([loss_sum, count, rows])
                    acc = part if acc is None else acc + part
                    b.eval_step_done()
                values = b.all_reduce_sum(acc).tolist()  # the evaluation's one host transfer
        finally:
            model.train(was_training)
        sums, counts = values[:n], values[n + 1 : 2 * n + 1]
        return self.metrics(step, sums, counts, time.perf_counter() - t0)

    def metrics(self, step: int, sums: Sequence[float], counts: Sequence[float], seconds: float) -> Dict[str, Any]:
        out: Dict[str, Any] = {"step": step}

        def put(suffix: str, s: float, c: float) -> None:
            loss = s / c if c > 0 else None
            out[f"val/loss{suffix}"] = loss
            out[f"val/ppl{suffix}"] = _ppl(loss)

        put("", sum(sums), sum(counts))
        for d in self.domains:
            put(
                f"/{d}",
                sum(s for s, dom in zip(sums, self.domain_of) if dom == d),
                sum(c for c, dom in zip(counts, self.domain_of) if dom == d),
            )
        for name, s, c in zip(self.names, sums, counts):
            put(f"/{name}", s, c)
        out["val/tokens"] = sum(counts)
        out.update({f"val/tokens/{name}": c for name, c in zip(self.names, counts)})
        out["val/time_s"] = seconds
        return out


def _eval_sources(cfg: DictConfig) -> Dict[str, SourceConfig]:
    """eval.sources by name, typed."""
    return {str(name): source_config(scfg) for name, scfg in cfg.eval.sources.items()}


def _ppl(loss: Optional[float]) -> Optional[float]:
    if loss is None or math.isnan(loss):
        return loss
    return math.exp(loss) if loss < 700 else float("inf")
