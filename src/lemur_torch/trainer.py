"""The training loop: accumulate, clip, guard, step, log, checkpoint. Backend-agnostic.

One optimizer step = `grad_accum` micro-batches per data-parallel rank, together exactly
`train.global_batch_tokens` tokens. The loss is the sum of token losses over the global batch divided by the
global count of label tokens (all-reduced first), so it does not depend on how the batch is split.
"""

from __future__ import annotations

import signal
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig

from lemur_torch import faults
from lemur_torch.attention import forward_kwargs
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.errors import DataReadError, NonFiniteError
from lemur_torch.metrics import MetricsLogger, Progress, mfu, peak_flops
from lemur_torch.model import batch_label_tokens, flops_per_token, token_loss_sums
from lemur_torch.optim import apply_config_on_resume
from lemur_torch.parallel.base import Backend, DeferredRead, grad_accum_steps
from lemur_torch.summary import run_summary
from lemur_torch.watchdog import StepWatchdog


@dataclass
class PendingStep:
    """A dispatched optimizer step whose metrics are still on their way from the device: `read()` waits for
    them and gives [loss, grad_norm, finite, label_tokens, loss_sum, per-domain sums, per-domain counts]
    (Backend.read_later); Trainer.complete calls it, exactly once."""

    step: int
    read: DeferredRead
    lr: float
    started: float = 0.0
    data_time: float = 0.0
    tokens_seen: int = 0
    done: bool = False


class StopSignal:
    """SIGTERM/SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits. Installed before the
    model is built, so a preemption warning during a long 70B load is not fatal. Repeated signals only
    re-set the flag, so a save in progress is never interrupted."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = True


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        backend: Backend,
        model,
        optimizer,
        scheduler,
        loader,
        checkpointer: Checkpointer,
        logger: MetricsLogger,
        stop: Optional[StopSignal] = None,
        validator=None,
    ):
        self.cfg, self.backend, self.model = cfg, backend, model
        self.optimizer, self.scheduler, self.loader = optimizer, scheduler, loader
        self.checkpointer, self.logger = checkpointer, logger
        self.grad_accum = grad_accum_steps(cfg, backend.dp_size)
        self.domains: List[str] = list(loader.domain_names)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.peak = peak_flops(cfg.log.peak_flops, backend.device_kind)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.stop = stop or StopSignal().install()
        self.validator = validator  # lemur_torch.validation.Validator, or None (eval.every_steps: 0)
        self.last_saved_step = -1
        self.resumed_from: Optional[str] = None
        self.progress = Progress(cfg.train.max_steps, 0)  # fit() restarts it at the resumed step
        self._aborting = False  # set when a read step ends a run of max_nonfinite_steps; raised in agree()
        self._last_nonfinite = ""

    # -- state -------------------------------------------------------------------------------------
    def trainer_state(self) -> Dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "run_id": self.checkpointer.run_id,
        }

    def maybe_resume(self) -> None:
        choice = self.checkpointer.choose_resume()  # rank 0 decides; every rank loads the same checkpoint
        self.logger.start_run(choice.run_id)  # a resumed run continues its wandb run
        if choice.path is None:
            return
        self.resumed_from = choice.path
        state = self.checkpointer.load(choice.path, self.model, self.optimizer, self.scheduler, self.loader)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.last_saved_step = self.step
        self.skipped_steps = state.get("skipped_steps", 0)
        for change in apply_config_on_resume(self.optimizer, self.scheduler, self.cfg.optim):
            self.logger.info(f"resume: {change}")
        self.logger.info(f"resumed from {choice.path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def save(self, wait: bool = False) -> None:
        """Checkpoint the current step (unless it is saved already); with `wait`, return only once it is
        committed. Asynchronous saves return as soon as the state is staged."""
        if self.last_saved_step != self.step:
            self.checkpointer.save(
                self.step, self.model, self.optimizer, self.scheduler, self.loader, self.trainer_state()
            )
            self.last_saved_step = self.step
        if wait:
            self.checkpointer.finalize()

    # -- loop --------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps, to train.stop_at_step, or until a stop signal. Returns 0, or the
        preemption exit code. Every way out waits for the checkpoint in flight.

        The host does not wait for the device before tracing the next step: a step's metrics (loss, grad norm,
        the finite guard) come back through Backend.read_later and are read during the next step, once that step's
        forward/backward is dispatched (XLA traces step k+1 while the device runs step k; CUDA queues its
        kernels) and before its optimizer step, or at the top of step k+1 where they are on the host already
        without waiting (CPU; CUDA when the device has finished step k), so a hang in step k+1 still logs step k.
        Everything that depends on step k's guard is therefore decided
        before step k+1 updates anything: the LR schedule advances only after an applied update (step k+1's lr
        is set from it), the skip counter counts it, and an abort is flagged. A checkpoint, a stop and the end
        of the run read their own step first (`settle`), so what is saved holds only read and checked steps.
        Host decisions (stop signal, abort) are agreed by all processes once per step with one small CPU
        collective (Backend.any_process), taken while the device runs.
        """
        t = self.cfg.train
        self.maybe_resume()
        if self.backend.any_process([self.stop.requested])[0]:
            # signalled while building or resuming: nothing new to save since the last checkpoint
            self.logger.info("stop signal received before the first step: exiting for requeue")
            return t.preempt_exit_code
        if self.logger.enabled:
            self.logger.info(
                run_summary(
                    self.cfg,
                    self.backend,
                    self.model,
                    self.loader,
                    self.grad_accum,
                    self.step,
                    self.tokens_seen,
                    self.resumed_from,
                )
            )
        self.progress = Progress(t.max_steps, self.step)
        batches = self.backend.device_batches(iter(self.loader))
        every = self.cfg.checkpoint.every_steps
        pending: Optional[PendingStep] = None
        with (
            StepWatchdog(t.hang_timeout_s, t.hang_exit_code, self.backend.rank) as watchdog,
            closing(self.checkpointer),
        ):
            while self.step < t.max_steps:
                watchdog.beat(self.step)
                if t.stop_at_step is not None and self.step >= t.stop_at_step:
                    self.settle(pending)
                    self.save(wait=True)
                    self.logger.info(
                        f"train.stop_at_step={t.stop_at_step} reached at step {self.step}: checkpoint committed, "
                        "stopping"
                    )
                    return 0
                if pending is not None and pending.read.ready():
                    # already on the host (CPU; CUDA once the device finished it): logged now, so a step that
                    # hangs or crashes next loses no line; where it is not there yet, step k+1 reads it
                    self.complete(pending)
                faults.before_step(self.step + 1, self.backend.rank)
                t0 = time.perf_counter()
                mark = self.loader.mark()  # the data position of the last completed step
                try:
                    micro = [next(batches) for _ in range(self.grad_accum)]
                except DataReadError:  # raised on every rank at the same micro-batch (data/loader.py)
                    self.loader.rewind(mark)
                    self.settle(pending)
                    self.save(wait=True)
                    raise
                data_time = time.perf_counter() - t0
                pending = self.train_step(micro, pending, started=t0)
                self.step += 1
                self.tokens_seen += t.global_batch_tokens
                pending.started, pending.data_time, pending.tokens_seen = t0, data_time, self.tokens_seen
                stop = self.agree()
                if self.validator is not None and self.validator.due(self.step) and not stop:
                    self.complete(pending)  # the step's line before its validation line (an evaluation is rare)
                    watchdog.beat(self.step)  # an evaluation gets the watchdog's timeout of its own, as a step does
                    self.logger.log_validation(
                        self.validator.run(self.model, self.step)
                    )  # a preemption's grace is the checkpoint's
                periodic = every and self.step % every == 0 and self.step < t.max_steps
                if stop or periodic:
                    stop = self.settle(pending) or stop  # a checkpoint holds only steps that were read and checked
                    self.save(wait=stop)
                if stop:
                    self.logger.info(f"stop signal honoured: checkpoint at step {self.step}, exiting for requeue")
                    return t.preempt_exit_code
            self.settle(pending)
            watchdog.beat(self.step)
            if self.cfg.checkpoint.save_at_end:
                self.save()
            self.checkpointer.finalize()  # the end waits for the last save (the export comes next)
            return 0

    def agree(self) -> bool:
        """All processes take the host decisions together, with one small collective: abort after too many
        non-finite steps (raises NonFiniteError on every process) and stop on a signal that reached any of
        them. Returns the stop decision."""
        stop, abort = self.backend.any_process([self.stop.requested, self._aborting])
        if abort:
            raise NonFiniteError(
                f"{self.cfg.train.max_nonfinite_steps} consecutive steps with a non-finite loss or grad norm "
                f"(last: {self._last_nonfinite or 'on another process'}); "
                f"lower optim.lr or check the data, then resume from the last checkpoint"
            )
        return stop

    def settle(self, pending: Optional["PendingStep"]) -> bool:
        """Read the last dispatched step (if not read yet) and agree on its outcome; returns the stop decision."""
        if pending is not None:
            self.complete(pending)
        return self.agree()

    def train_step(
        self,
        micro: List[Dict[str, torch.Tensor]],
        previous: Optional["PendingStep"] = None,
        started: Optional[float] = None,
    ) -> "PendingStep":
        """Forward/backward over the micro-batches, clip, guarded optimizer step. The previous step is read
        (`complete`) after this step's forward/backward is dispatched and before its optimizer step, so this
        step's lr already reflects whether the previous update was applied. Nothing of this step is read on the
        host here: its metrics come back as one device tensor in the returned PendingStep."""
        t, b = self.cfg.train, self.backend
        device = micro[0]["input_ids"].device
        n_dom = len(self.domains)
        # global label-token count first: each micro-batch's loss sum is divided by it
        local_tokens = sum(batch_label_tokens(mb) for mb in micro).to(torch.float32)
        global_tokens = b.all_reduce_sum(local_tokens.clone()).clamp(min=1.0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        dom_sum = torch.zeros(n_dom, dtype=torch.float32, device=device)
        dom_cnt = torch.zeros(n_dom, dtype=torch.float32, device=device)
        for i, mb in enumerate(micro):
            b.prepare_backward(self.model, i, len(micro))
            logits = self.model(**forward_kwargs(mb)).logits  # ids, positions, document boundaries
            s, ds, dc = token_loss_sums(logits, mb["labels"], mb["domain_ids"], n_dom, t.loss_chunk)
            (s / global_tokens).backward()
            loss_sum += s.detach()
            dom_sum += ds
            dom_cnt += dc
        reduced = b.all_reduce_sum(torch.cat([loss_sum.view(1), dom_sum, dom_cnt]))
        grad_norm = b.clip_grad_norm_(self.model, t.grad_clip)
        loss = reduced[0] / global_tokens
        finite_t = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if previous is not None:
            self.complete(previous, ended=started)  # sets this step's lr: the schedule counts applied updates
        lr = self.scheduler.get_last_lr()[0]
        self.checkpointer.wait_staged()  # an asynchronous save may still be copying the weights off the device
        b.optimizer_step(self.optimizer, finite_t)  # skipped when not finite (decided on device for XLA)
        self.optimizer.zero_grad(set_to_none=True)
        # built before step_done so it is part of the step's graph (XLA: one graph per step); read later
        values = torch.cat(
            [
                loss.view(1),
                grad_norm.detach().float().view(1).to(loss.device),
                finite_t.float().view(1),
                global_tokens.view(1),
                reduced,
            ]
        )
        b.step_done()
        return PendingStep(step=self.step + 1, read=b.read_later(values), lr=lr)

    def complete(self, pending: "PendingStep", ended: Optional[float] = None) -> None:
        """Read a dispatched step's metrics (its one device-to-host transfer; waits for that step only), then
        act on its guard: advance the LR schedule after an applied update, count a skipped one, flag an abort
        (raised on every process together in `agree`), and log. `ended`: when the next step started (else now),
        for the step time."""
        if pending.done:
            return
        t0 = time.perf_counter()
        host = pending.read()
        wait = time.perf_counter() - t0
        pending.done = True
        n_dom = len(self.domains)
        loss_v, gnorm_v, finite, n_tokens, red = host[0], host[1], host[2] > 0, host[3], host[4:]
        if finite:
            self.scheduler.step()  # the schedule counts applied updates: a skipped step does not advance it
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self._last_nonfinite = f"step {pending.step}: loss={loss_v}, grad_norm={gnorm_v}"
        self._aborting = self.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps
        dom_sum_v, dom_cnt_v = red[1 : 1 + n_dom], red[1 + n_dom : 1 + 2 * n_dom]
        stats = {
            "step": pending.step,
            "loss": loss_v,
            "grad_norm": gnorm_v,
            "lr": pending.lr,
            "finite": finite,
            "domain_loss": {
                d: (dom_sum_v[i] / dom_cnt_v[i] if dom_cnt_v[i] > 0 else None) for i, d in enumerate(self.domains)
            },
            "label_tokens": int(n_tokens),
            "data_time_s": pending.data_time,
            "host_wait_s": wait,
            "tokens_seen": pending.tokens_seen,
        }
        self.log_step(stats, (ended if ended is not None else time.perf_counter()) - pending.started)

    def log_step(self, stats: Dict[str, Any], step_time: float) -> None:
        step = stats["step"]
        if step % self.cfg.log.every_steps and step != self.cfg.train.max_steps:
            return
        tokens_per_s = self.cfg.train.global_batch_tokens / step_time
        metrics: Dict[str, Any] = {
            "step": step,
            "loss": stats["loss"],
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.backend.num_devices,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, self.backend.num_devices),
            "step_time_s": step_time,
            "data_time_s": stats["data_time_s"],
            "host_wait_s": stats["host_wait_s"],
            "tokens_seen": stats["tokens_seen"],
            "label_tokens": stats["label_tokens"],
            "skipped_steps": self.skipped_steps,
        }
        metrics.update({f"loss/{d}": v for d, v in stats["domain_loss"].items()})
        metrics.update({f"data/{k}": v for k, v in self.loader.stats().items()})
        metrics.update(self.backend.memory_stats())
        metrics.update(self.checkpointer.stats())
        metrics.update(self.progress.update(step))
        self.logger.log_step(metrics)
