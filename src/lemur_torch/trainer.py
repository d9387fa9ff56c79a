"""The training loop: accumulate, clip, guard, step, log, checkpoint. Backend-agnostic.

One optimizer step = `grad_accum` micro-batches per data-parallel rank, together exactly
`train.global_batch_tokens` tokens. The loss is the sum of token losses over the global batch divided by the
global count of label tokens (all-reduced first), so it does not depend on how the batch is split.

The one-step-late read. The host does not wait for the device after a step: the step's metrics (loss, grad norm,
the finite guard) come back through Backend.read_later and wait in the `InFlight` step, which
`Trainer.read_in_flight` alone reads. Step k is read during step k+1, once k+1's forward/backward is dispatched and
before its optimizer step (XLA traces step k+1 while the device runs step k; CUDA queues its kernels), or at the
top of step k+1 where it is on the host already without waiting (CPU; CUDA when the device has finished step k), so
a hang in step k+1 still logs step k. Everything that depends on step k's guard is therefore decided before step
k+1 updates anything (`apply_guard`): the LR schedule advances only after an applied update (step k+1's lr is set
from it), the skip counter counts it, and an abort is flagged. A validation, a checkpoint, a stop and the end of
the run read their own step first, so what is saved holds only read and checked steps. Host decisions (stop
signal, abort) are agreed by all processes once per step with one small CPU collective (Backend.any_process),
taken while the device runs.
"""

from __future__ import annotations

import signal
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from lemur_torch import faults
from lemur_torch.attention import forward_kwargs
from lemur_torch.batch import DeviceBatch, Loader
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.errors import DataReadError, NonFiniteError, Preempted
from lemur_torch.metrics import MetricsLogger, Progress, mfu, peak_flops
from lemur_torch.model import batch_label_tokens, flops_per_token, token_loss_sums
from lemur_torch.optim import apply_config_on_resume
from lemur_torch.parallel.base import Backend, DeferredRead, grad_accum_steps
from lemur_torch.plan.run import predict_run
from lemur_torch.summary import run_summary
from lemur_torch.watchdog import StepWatchdog


@dataclass
class Gradients:
    """A step after its forward/backward and clipping, before its update: device tensors, nothing read."""

    loss: torch.Tensor  # global mean over label tokens
    grad_norm: torch.Tensor  # before clipping
    finite: torch.Tensor  # 0-d bool: loss and grad norm are finite (the guard)
    label_tokens: torch.Tensor  # global count
    sums: torch.Tensor  # all-reduced [loss sum, per-domain loss sums, per-domain label-token counts]


@dataclass
class StepMetrics:
    """A step's metrics on the host. They travel as one small device tensor (`pack`), read once (`unpack`)."""

    loss: float
    grad_norm: float
    finite: bool
    label_tokens: int
    domain_loss: Dict[str, Optional[float]]

    @staticmethod
    def pack(g: Gradients) -> torch.Tensor:
        """[loss, grad_norm, finite, label_tokens, loss sum, per-domain sums, per-domain counts]."""
        return torch.cat(
            [
                g.loss.view(1),
                g.grad_norm.detach().float().view(1).to(g.loss.device),
                g.finite.float().view(1),
                g.label_tokens.view(1),
                g.sums,
            ]
        )

    @classmethod
    def unpack(cls, values: List[float], domains: List[str]) -> "StepMetrics":
        n = len(domains)
        sums, counts = values[5 : 5 + n], values[5 + n : 5 + 2 * n]
        return cls(
            loss=values[0],
            grad_norm=values[1],
            finite=values[2] > 0,
            label_tokens=int(values[3]),
            domain_loss={d: (sums[i] / counts[i] if counts[i] > 0 else None) for i, d in enumerate(domains)},
        )


@dataclass
class InFlight:
    """A dispatched optimizer step whose metrics are still on their way from the device."""

    step: int
    metrics: DeferredRead  # StepMetrics.pack's tensor, on its way to the host
    lr: float  # the lr its update was applied with
    started: float  # when the step began, its data wait included
    data_time: float
    tokens_seen: int


class StopSignal:
    """SIGTERM/SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits (one that comes while a
    step is being saved ends the run on that save). Installed before the model is built, so a preemption
    warning during a long 70B load is not fatal. Repeated signals only re-set the flag, so a save in progress
    is never interrupted. DataLoader workers ignore them (data/stream.py): Slurm signals them too."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        self.requested = True


class Trainer:
    """Runs the loop (`fit`) over the parts train.py builds; `train_step` runs one optimizer step on its own (tests
    and benchmarks drive steps with it, exactly as `fit` does)."""

    def __init__(
        self,
        cfg: DictConfig,
        backend: Backend,
        model,
        optimizer,
        scheduler,
        loader: Loader,
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
        # the planner's step time for this run, once: each logged step is compared with it (calibration)
        plan, self.prediction = predict_run(cfg, backend.device_kind, backend.num_devices)
        self.predicted_step_s = plan.step_time_s if plan is not None else None
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.stop = stop or StopSignal().install()
        self.validator = validator  # lemur_torch.validation.Validator, or None (eval.every_steps: 0)
        self.last_saved_step = -1
        self.resumed_from: Optional[str] = None
        self.progress = Progress(cfg.train.max_steps, 0)  # start() restarts it at the resumed step
        self.in_flight: Optional[InFlight] = None
        self._aborting = False  # set when a read step ends a run of max_nonfinite_steps; raised in agree()
        self._last_nonfinite = ""

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to train.max_steps or to train.stop_at_step; after a stop signal, checkpoint the step reached and
        raise Preempted. Every way out waits for the checkpoint in flight. Reads follow the one-step-late order
        (module docstring)."""
        t = self.cfg.train
        self.start()
        batches = self.backend.device_batches(iter(self.loader))
        with (
            StepWatchdog(t.hang_timeout_s, t.hang_exit_code, self.backend.rank) as watchdog,
            closing(self.checkpointer),
        ):
            while self.step < t.max_steps:
                watchdog.beat(self.step)
                if t.stop_at_step is not None and self.step >= t.stop_at_step:
                    self.settle()
                    self.save(wait=True)
                    self.logger.info(
                        f"train.stop_at_step={t.stop_at_step} reached at step {self.step}: checkpoint committed, "
                        "stopping"
                    )
                    return
                self.read_in_flight(only_if_ready=True)  # a step that hangs or crashes next loses no line
                micro, started, data_time = self.next_micro_batches(batches)
                self.train_step(micro, started, data_time)
                stop = self.agree()
                if self.validator is not None and self.validator.due(self.step) and not stop:
                    self.validate(watchdog)
                if stop and self.backend.any_process([self.checkpointer.in_flight()])[0]:
                    self.stop_on_save_in_flight()
                if stop or self.checkpoint_due():
                    stop = self.settle() or stop  # a checkpoint holds only steps that were read and checked
                    self.save(wait=stop)
                    if not stop and self.agree():  # a stop that came during this save ends the run on it
                        stop = True
                        self.save(wait=True)  # this step is saved already: waits for that save's commit
                if stop:
                    self.logger.info(f"stop signal honoured: checkpoint at step {self.step}, exiting for requeue")
                    raise Preempted(self.step, t.preempt_exit_code)
            self.settle()
            watchdog.beat(self.step)
            if self.cfg.checkpoint.save_at_end:
                self.save()
            self.checkpointer.finalize()  # the end waits for the last save (the export comes next)

    def stop_on_save_in_flight(self) -> None:
        """A stop that came while an asynchronous save was still being written (on any rank) ends the run on that
        save: saving the step reached too would wait for it and then write the whole state again, in the grace time
        a preemption leaves. The steps trained since are trained again after the resume."""
        self.checkpointer.finalize()
        self.logger.info(
            f"stop signal honoured during the save of step {self.last_saved_step}: that checkpoint committed, "
            f"steps {self.last_saved_step + 1}-{self.step} are trained again on resume; exiting for requeue"
        )
        raise Preempted(self.last_saved_step, self.cfg.train.preempt_exit_code)

    def start(self) -> None:
        """Resume (or start fresh), honour a stop signal that came while the run was built, print the summary."""
        self.maybe_resume()
        if self.backend.any_process([self.stop.requested])[0]:
            # signalled while building or resuming: nothing new to save since the last checkpoint
            self.logger.info("stop signal received before the first step: exiting for requeue")
            raise Preempted(self.step, self.cfg.train.preempt_exit_code)
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
                    self.prediction,
                )
            )
        self.progress = Progress(self.cfg.train.max_steps, self.step)

    def next_micro_batches(self, batches: Iterator[DeviceBatch]) -> Tuple[List[DeviceBatch], float, float]:
        """This step's micro-batches, when the step started and how long its data took. A read that failed for good
        (raised on every rank at the same micro-batch, data/loader.py) rewinds the loader to the last completed
        step, which is checkpointed before the error goes on."""
        faults.before_step(self.step + 1, self.backend.rank)
        started = time.perf_counter()
        mark = self.loader.mark()
        try:
            micro = [next(batches) for _ in range(self.grad_accum)]
        except DataReadError:
            self.loader.rewind(mark)
            self.settle()
            self.save(wait=True)
            raise
        return micro, started, time.perf_counter() - started

    def train_step(self, micro: List[DeviceBatch], started: Optional[float] = None, data_time: float = 0.0) -> None:
        """One optimizer step, left in flight: forward/backward, then the read of the step before (its guard sets
        this step's lr), then the update. Nothing of this step is read here."""
        started = time.perf_counter() if started is None else started
        grads = self.forward_backward(micro)
        self.read_in_flight(ended=started)
        metrics, lr = self.update(grads)
        self.step += 1
        self.tokens_seen += self.cfg.train.global_batch_tokens
        self.in_flight = InFlight(self.step, metrics, lr, started, data_time, self.tokens_seen)

    def forward_backward(self, micro: List[DeviceBatch]) -> Gradients:
        """Forward/backward over the micro-batches, gradients summed, then clipped; the guard computed on device."""
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
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        return Gradients(loss, grad_norm, finite, global_tokens, reduced)

    def update(self, grads: Gradients) -> Tuple[DeferredRead, float]:
        """The optimizer step, skipped on the device where the guard fails, with the lr the schedule holds now.
        Returns the handle to the step's metrics and that lr."""
        b = self.backend
        lr = self.scheduler.get_last_lr()[0]
        self.checkpointer.wait_staged()  # an asynchronous save may still be copying the weights off the device
        b.optimizer_step(self.optimizer, grads.finite)  # skipped when not finite (decided on device for XLA)
        b.after_optimizer_step(self.model)  # whether applied or skipped: nothing is read here
        self.optimizer.zero_grad(set_to_none=True)
        packed = StepMetrics.pack(grads)  # before step_done: part of the step's graph (XLA: one graph per step)
        b.step_done()
        return b.read_later(packed), lr

    # -- the one-step-late read ----------------------------------------------------------------------
    def read_in_flight(self, ended: Optional[float] = None, only_if_ready: bool = False) -> None:
        """Read the step in flight, if any: its one device-to-host transfer (waits for that step only), then its
        guard applied and its line logged. `ended`: when the next step started (else now), for the step time;
        `only_if_ready`: only if its metrics are on the host already."""
        step = self.in_flight
        if step is None or (only_if_ready and not step.metrics.ready()):
            return
        self.in_flight = None
        t0 = time.perf_counter()
        metrics = StepMetrics.unpack(step.metrics(), self.domains)
        wait = time.perf_counter() - t0
        self.apply_guard(step.step, metrics)
        self.log_step(step, metrics, wait, (ended if ended is not None else time.perf_counter()) - step.started)

    def apply_guard(self, step: int, metrics: StepMetrics) -> None:
        """Act on a read step's guard (its update was applied or skipped already): the LR schedule counts applied
        updates only, a skipped step is counted, and train.max_nonfinite_steps skipped in a row flag the abort,
        raised on every process together by `agree`."""
        if metrics.finite:
            self.scheduler.step()
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self._last_nonfinite = f"step {step}: loss={metrics.loss}, grad_norm={metrics.grad_norm}"
        self._aborting = self.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps

    def settle(self) -> bool:
        """Read the step in flight (if not read yet) and agree on its outcome; returns the stop decision."""
        self.read_in_flight()
        return self.agree()

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

    def validate(self, watchdog: StepWatchdog) -> None:
        """Evaluate the held-out rows after the step just dispatched, which is read and logged first."""
        self.read_in_flight()  # the step's line before its validation line (an evaluation is rare)
        watchdog.beat(self.step)  # an evaluation gets the watchdog's timeout of its own, as a step does
        self.logger.log_validation(self.validator.run(self.model, self.step))  # a preemption's grace is the save's

    def log_step(self, step: InFlight, m: StepMetrics, host_wait: float, step_time: float) -> None:
        if step.step % self.cfg.log.every_steps and step.step != self.cfg.train.max_steps:
            return
        tokens_per_s = self.cfg.train.global_batch_tokens / step_time
        metrics: Dict[str, Any] = {
            "step": step.step,
            "loss": m.loss,
            "lr": step.lr,
            "grad_norm": m.grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.backend.num_devices,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, self.backend.num_devices),
            "step_time_s": step_time,
            "data_time_s": step.data_time,
            "host_wait_s": host_wait,
            "tokens_seen": step.tokens_seen,
            "label_tokens": m.label_tokens,
            "skipped_steps": self.skipped_steps,
        }
        if self.predicted_step_s:
            metrics["step_time_predicted_s"] = self.predicted_step_s
            metrics["step_time_vs_predicted"] = step_time / self.predicted_step_s
        metrics.update({f"loss/{d}": v for d, v in m.domain_loss.items()})
        metrics.update({f"data/{k}": v for k, v in self.loader.stats().items()})
        metrics.update(self.backend.memory_stats())
        metrics.update(self.checkpointer.stats())
        metrics.update(self.progress.update(step.step))
        self.logger.log_step(metrics)

    # -- state ---------------------------------------------------------------------------------------
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
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]
        self.last_saved_step = self.step
        for change in apply_config_on_resume(self.optimizer, self.scheduler, self.cfg.optim):
            self.logger.info(f"resume: {change}")
        self.logger.info(f"resumed from {choice.path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.step % every == 0 and self.step < self.cfg.train.max_steps

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
