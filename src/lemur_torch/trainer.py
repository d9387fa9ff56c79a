"""The training loop: accumulate, clip, guard, step, log, checkpoint. Backend-agnostic.

One optimizer step = `grad_accum` micro-batches per data-parallel rank, together exactly
`train.global_batch_tokens` tokens. The loss is the sum of token losses over the global batch divided by the
global count of label tokens (all-reduced first), so it does not depend on how the batch is split.

Nothing inside a step waits for the device. The non-finite guard is decided on the device (the update is skipped
there, Backend.optimizer_step) and the lr of each update is computed there from an on-device count of applied
updates (lemur_torch.optim.DeviceLR), so step k+1 is queued (CUDA) or traced and launched (XLA) without knowing
whether step k was applied. The step's metrics (loss, grad norm, the guard) come back through Backend.read_later
and wait in the `InFlight` step: step k is read at the end of step k+1, once k+1 is queued behind it (the host
waits for step k while the device runs k+1), or at the top of step k+1 where it is on the host already without
waiting (CPU; CUDA when the device has finished step k), so a hang in step k+1 still logs step k. Reading a step
applies its guard on the host (`apply_guard`): the host's LambdaLR, which checkpoints hold, counts applied
updates as the device did (the read carries the device's count, and the two are checked equal); the skipped
steps are the steps the device did not apply; max_nonfinite_steps in a row flag the abort. A
validation, a checkpoint, a stop and the end of the run read the step in flight first, so what is saved holds
only read and checked steps.

The agreement. Host decisions are taken by all processes together, once per step, with one small CPU
collective (`agree`: Backend.any_process), after the step's micro-batches are on the host and before any
collective of the step: a stop signal that reached any process, an abort flagged by a read, and a reader that
failed for good. So no process enters a step another has left, and a step with a failed read is never run: every
process rewinds the loader to the step's start, checkpoints the last completed step and raises the failure
(named by the process that hit it). A stop is honoured there too (the step's micro-batches go back to the loader,
the checkpoint holds the step reached), and before a validation or a checkpoint (`settle`).
"""

from __future__ import annotations

import signal
import time
from contextlib import closing
from typing import Any, Dict, Iterator, List, NoReturn, Optional

import torch
from omegaconf import DictConfig

from lemur_torch import faults
from lemur_torch.attention import forward_kwargs
from lemur_torch.batch import DeviceBatch, Loader
from lemur_torch.checkpoint import Checkpointer
from lemur_torch.errors import BadInputError, DataReadError, LemurError, NonFiniteError, Preempted
from lemur_torch.metrics import MetricsLogger, Progress, mfu, peak_flops
from lemur_torch.model import batch_label_tokens, flops_per_token, token_loss_sums
from lemur_torch.optim import DeviceLR, apply_config_on_resume
from lemur_torch.parallel.base import Backend, DeferredRead, grad_accum_steps
from lemur_torch.plan.run import predict_run
from lemur_torch.step_records import Gradients, InFlight, MicroBatches, StepMetrics
from lemur_torch.summary import run_summary
from lemur_torch.watchdog import StepWatchdog


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
        self.device_lr = DeviceLR(scheduler, cfg.optim, cfg.train.max_steps, backend.device, backend.replicated)
        self._aborting = False  # set when a read step ends a run of max_nonfinite_steps; raised in agree()
        self._last_nonfinite = ""

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to train.max_steps or to train.stop_at_step; after a stop signal, checkpoint the step reached and
        raise Preempted. Every way out waits for the checkpoint in flight. Reads and agreements follow the order in
        the module docstring."""
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
                fetched = self.next_micro_batches(batches)
                if self.agree_on_step(fetched):
                    self.loader.rewind(fetched.mark)  # not trained on: the checkpoint's data position precedes them
                    if self.backend.any_process([self.checkpointer.in_flight()])[0]:
                        self.stop_on_save_in_flight()
                    self.stop_with_checkpoint()
                self.train_step(fetched.micro, fetched.started, fetched.data_time)
                validate = self.validator is not None and self.validator.due(self.step)
                if validate or self.checkpoint_due():
                    if self.settle():  # a checkpoint holds only steps that were read and checked
                        self.stop_with_checkpoint()
                    if validate:
                        self.validate(watchdog)
                    if self.checkpoint_due():
                        self.save()
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

    def next_micro_batches(self, batches: Iterator[DeviceBatch]) -> MicroBatches:
        """This step's micro-batches, when the step started and how long its data took; no collective. A reader
        that failed for good on this process is handed on, to be agreed (`agree_on_step`)."""
        faults.before_step(self.step + 1, self.backend.rank)
        started = time.perf_counter()
        mark = self.loader.mark()
        try:
            micro = [next(batches) for _ in range(self.grad_accum)]
        except (DataReadError, BadInputError) as exc:
            return MicroBatches([], mark, started, time.perf_counter() - started, exc)
        return MicroBatches(micro, mark, started, time.perf_counter() - started)

    def agree_on_step(self, fetched: MicroBatches) -> bool:
        """The step's agreement, before any collective of the step: raises a reader's failure on every process
        (after a DataReadError, with the last completed step checkpointed) and an abort; returns the stop
        decision."""
        try:
            return self.agree(fetched.failure)
        except DataReadError:
            self.loader.rewind(fetched.mark)
            self.settle()
            self.save(wait=True)
            raise

    def train_step(self, micro: List[DeviceBatch], started: Optional[float] = None, data_time: float = 0.0) -> None:
        """One optimizer step, left in flight: forward/backward, the update (guard and lr on the device), then the
        read of the step before, which the device finishes while this one waits behind it. Nothing of this step
        is read here."""
        started = time.perf_counter() if started is None else started
        grads = self.forward_backward(micro)
        metrics = self.update(grads)
        self.read_in_flight(ended=started)
        self.step += 1
        self.tokens_seen += self.cfg.train.global_batch_tokens
        self.in_flight = InFlight(self.step, metrics, started, data_time, self.tokens_seen)

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
            del logits  # the loss's graph keeps what its backward needs; the next forward must not find these alive
            (s / global_tokens).backward()
            loss_sum += s.detach()
            dom_sum += ds
            dom_cnt += dc
        reduced = b.all_reduce_sum(torch.cat([loss_sum.view(1), dom_sum, dom_cnt]))
        grad_norm = b.clip_grad_norm_(self.model, t.grad_clip)
        loss = reduced[0] / global_tokens
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        return Gradients(loss, grad_norm, finite, global_tokens, reduced)

    def update(self, grads: Gradients) -> DeferredRead:
        """The optimizer step, skipped on the device where the guard fails, with the lr computed on the device;
        the applied count advances by the guard. Returns the handle to the step's metrics."""
        b = self.backend
        self.checkpointer.wait_staged()  # an asynchronous save may still be copying the weights off the device
        with self.device_lr.applied_to(self.optimizer):
            b.optimizer_step(self.optimizer, grads.finite)
        self.device_lr.count(grads.finite)
        b.after_optimizer_step(self.model)  # whether applied or skipped: nothing is read here
        self.optimizer.zero_grad(set_to_none=True)
        # before step_done: part of the step's graph (XLA: one graph per step)
        packed = StepMetrics.pack(grads, self.device_lr.applied)
        b.step_done()
        return b.read_later(packed)

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
        lr = self.scheduler.get_last_lr()[0]  # what the device computed for its update: the same count and formula
        self.apply_guard(step.step, metrics)
        self.log_step(step, metrics, lr, wait, (ended if ended is not None else time.perf_counter()) - step.started)

    def apply_guard(self, step: int, metrics: StepMetrics) -> None:
        """Act on a read step's guard (its update was applied or skipped on the device already): the host's LR
        schedule counts applied updates, as the device's count did; the skipped steps are the steps the device did
        not apply; train.max_nonfinite_steps skipped in a row flag the abort, raised on every process together by
        `agree`."""
        if metrics.finite:
            self.scheduler.step()
            self.consecutive_nonfinite = 0
        else:
            self.consecutive_nonfinite += 1
            self._last_nonfinite = f"step {step}: loss={metrics.loss}, grad_norm={metrics.grad_norm}"
        # the device's count of applied updates is the record (it set this step's lr); the host's schedule must
        # have counted the same, or checkpoints would hold a schedule position the device never used
        if self.scheduler.last_epoch != metrics.applied_updates:
            raise RuntimeError(
                f"step {step}: the host's lr schedule counts {self.scheduler.last_epoch} applied updates, the "
                f"device {metrics.applied_updates}"
            )
        self.skipped_steps = step - metrics.applied_updates
        self._aborting = self.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps

    def settle(self) -> bool:
        """Read the step in flight (if not read yet) and agree on its outcome; returns the stop decision."""
        self.read_in_flight()
        return self.agree()

    def agree(self, failure: Optional[LemurError] = None) -> bool:
        """All processes take the host decisions together, with one small collective: abort after too many
        non-finite steps (NonFiniteError on every process), a reader's failure on any of them (`failure`, raised
        on every process with the message of the first that had one) and stop on a signal that reached any of
        them. Returns the stop decision."""
        stop, abort, failed = self.backend.any_process([self.stop.requested, self._aborting, failure is not None])
        if abort:
            raise NonFiniteError(
                f"{self.cfg.train.max_nonfinite_steps} consecutive steps with a non-finite loss or grad norm "
                f"(last: {self._last_nonfinite or 'on another process'}); "
                f"lower optim.lr or check the data, then resume from the last checkpoint"
            )
        if failed:  # an object collective, on this way out only: every process names the failing file
            raise next(f for f in self.backend.gather_object(failure) if f is not None)
        return stop

    def stop_with_checkpoint(self) -> NoReturn:
        """The agreed stop: the step reached (read and checked first) is checkpointed, then Preempted."""
        self.settle()
        self.save(wait=True)
        self.logger.info(f"stop signal honoured: checkpoint at step {self.step}, exiting for requeue")
        raise Preempted(self.step, self.cfg.train.preempt_exit_code)

    def validate(self, watchdog: StepWatchdog) -> None:
        """Evaluate the held-out rows after the step just dispatched, which is read and logged first."""
        self.read_in_flight()  # the step's line before its validation line (an evaluation is rare)
        watchdog.beat(self.step)  # an evaluation gets the watchdog's timeout of its own, as a step does
        self.logger.log_validation(self.validator.run(self.model, self.step))  # a preemption's grace is the save's

    def log_step(self, step: InFlight, m: StepMetrics, lr: float, host_wait: float, step_time: float) -> None:
        """The step's line, on log steps and where it is logged only (what it gathers costs host time)."""
        if not self.logger.enabled or (step.step % self.cfg.log.every_steps and step.step != self.cfg.train.max_steps):
            return
        tokens_per_s = self.cfg.train.global_batch_tokens / step_time
        metrics: Dict[str, Any] = {
            "step": step.step,
            "loss": m.loss,
            "lr": lr,
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
        self.device_lr.sync(self.scheduler)
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
