"""The training loop: accumulate, clip, guard, step, log, checkpoint. Backend-agnostic.

One optimizer step = `grad_accum` micro-batches per data-parallel rank, together exactly
`train.global_batch_tokens` tokens. The loss is the sum of token losses over the global batch divided by the
global count of label tokens (all-reduced first), so it does not depend on how the batch is split.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig

from lemur_torch.checkpoint import Checkpointer
from lemur_torch.config import grad_accum_steps
from lemur_torch.metrics import MetricsLogger, mfu, peak_flops
from lemur_torch.model import batch_label_tokens, flops_per_token, token_loss_sums
from lemur_torch.parallel.base import Backend


class NonFiniteError(RuntimeError):
    pass


@dataclass
class PendingStep:
    """A dispatched optimizer step whose metrics are still on their way from the device: `read()` waits for
    them and gives [loss, grad_norm, finite, label_tokens, loss_sum, per-domain sums, per-domain counts]
    (Backend.read_later); Trainer.complete calls it."""

    step: int
    read: Callable[[], List[float]]
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
    def __init__(self, cfg: DictConfig, backend: Backend, model, optimizer, scheduler, loader,
                 checkpointer: Checkpointer, logger: MetricsLogger, stop: Optional[StopSignal] = None):
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
        self.last_saved_step = -1
        self._aborting = False  # set when a read step ends a run of max_nonfinite_steps; raised in agree()
        self._last_nonfinite = ""

    # -- state -------------------------------------------------------------------------------------
    def trainer_state(self) -> Dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps}

    def maybe_resume(self) -> None:
        path = self.checkpointer.resume_path()
        if path is None:
            return
        state = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler, self.loader)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.last_saved_step = self.step
        self.skipped_steps = state.get("skipped_steps", 0)
        self.logger.info(f"resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def save(self) -> str:
        t0 = time.perf_counter()
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, self.loader, self.trainer_state())
        self.last_saved_step = self.step
        self.logger.info(f"checkpoint {path} written in {time.perf_counter() - t0:.1f}s")
        return path

    # -- loop --------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to train.max_steps (or until a stop signal). Returns 0, or the preemption exit code.

        Each step is dispatched before the previous one is read back: `train_step` returns the step's
        metrics still on the device (a PendingStep), and they are read one iteration later, after the next
        step has been dispatched, so the host never waits for the device between steps (XLA traces step k+1
        while the device runs step k; CUDA queues its kernels). Everything that needs the numbers waits for
        them first: the non-finite abort and the log lines follow one step behind, and a checkpoint or the end
        of the run reads its own step before going on. Host decisions (stop signal, abort) are agreed by all
        processes once per step with one small collective (Backend.any_process), taken while the device runs.
        """
        t = self.cfg.train
        self.maybe_resume()
        if self.backend.any_process([self.stop.requested])[0]:
            # signalled while building or resuming: nothing new to save since the last checkpoint
            self.logger.info("stop signal received before the first step: exiting for requeue")
            return t.preempt_exit_code
        self.logger.info(
            f"training {self.cfg.model.name} on {self.backend.world_size} process(es) [{self.backend.name}], "
            f"{self.grad_accum} micro-batch(es) of {t.micro_batch_size}x{t.seq_len} per rank per step, "
            f"{t.global_batch_tokens:,} tokens/step, steps {self.step}->{t.max_steps}"
        )
        batches = self.backend.device_batches(iter(self.loader))
        every = self.cfg.checkpoint.every_steps
        pending: Optional[PendingStep] = None
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.grad_accum)]
            data_time = time.perf_counter() - t0
            current = self.train_step(micro)
            self.step += 1
            self.tokens_seen += t.global_batch_tokens
            current.started, current.data_time, current.tokens_seen = t0, data_time, self.tokens_seen
            if pending is not None:
                self.complete(pending, ended=t0)  # the previous step, read while this one runs
            pending = current
            stop = self.agree()
            time_boxed = t.stop_at_step is not None and t.stop_at_step <= self.step < t.max_steps
            periodic = every and self.step % every == 0 and self.step < t.max_steps
            if stop or time_boxed or periodic:
                self.complete(pending)  # a checkpoint holds only steps that were read and checked
                self.agree()
                self.save()
            if time_boxed:
                self.logger.info(f"train.stop_at_step={t.stop_at_step} reached: checkpoint written, stopping")
                return 0
            if stop:
                self.logger.info(f"stop signal honoured: checkpoint at step {self.step}, exiting for requeue")
                return t.preempt_exit_code
        if pending is not None:
            self.complete(pending)
            self.agree()
        if self.cfg.checkpoint.save_at_end and self.last_saved_step != self.step:
            self.save()
        return 0

    def agree(self) -> bool:
        """All processes take the host decisions together, with one small collective: abort after too many
        non-finite steps (raises NonFiniteError on every process) and stop on a signal that reached any of
        them. Returns the stop decision."""
        stop, abort = self.backend.any_process([self.stop.requested, self._aborting])
        if abort:
            raise NonFiniteError(
                f"{self.cfg.train.max_nonfinite_steps} consecutive steps with a non-finite loss or grad norm "
                f"(last: {self._last_nonfinite or 'on another process'}) by step {self.step}; "
                f"lower optim.lr or check the data, then resume from the last checkpoint"
            )
        return stop

    def train_step(self, micro: List[Dict[str, torch.Tensor]]) -> "PendingStep":
        """Forward/backward over the micro-batches, clip, guarded optimizer step. Nothing here reads a device
        value on the host: the step's metrics come back as one device tensor in a PendingStep."""
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
            logits = self.model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            s, ds, dc = token_loss_sums(logits, mb["labels"], mb["domain_ids"], n_dom, t.loss_chunk)
            (s / global_tokens).backward()
            loss_sum += s.detach()
            dom_sum += ds
            dom_cnt += dc
        reduced = b.all_reduce_sum(torch.cat([loss_sum.view(1), dom_sum, dom_cnt]))
        grad_norm = b.clip_grad_norm_(self.model, t.grad_clip)
        loss = reduced[0] / global_tokens
        lr = self.scheduler.get_last_lr()[0]
        finite_t = torch.isfinite(loss) & torch.isfinite(grad_norm)
        b.optimizer_step(self.optimizer, finite_t)  # skipped when not finite (decided on device for XLA)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        # built before step_done so it is part of the step's graph (XLA: one graph per step); read later
        values = torch.cat([loss.view(1), grad_norm.detach().float().view(1).to(loss.device), finite_t.float().view(1),
                            global_tokens.view(1), reduced])
        b.step_done()
        return PendingStep(step=self.step + 1, read=b.read_later(values), lr=lr)

    def complete(self, pending: "PendingStep", ended: Optional[float] = None) -> None:
        """Read a dispatched step's metrics (the step's one device-to-host transfer; waits for that step
        only), count non-finite steps and log. An abort is only flagged here: every process raises together
        in `agree`. `ended`: when the next step started (else now), for the step time."""
        if pending.done:
            return
        t0 = time.perf_counter()
        host = pending.read()
        wait = time.perf_counter() - t0
        pending.done = True
        n_dom = len(self.domains)
        loss_v, gnorm_v, finite, n_tokens, red = host[0], host[1], host[2] > 0, host[3], host[4:]
        if finite:
            self.consecutive_nonfinite = 0
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
            self._last_nonfinite = f"step {pending.step}: loss={loss_v}, grad_norm={gnorm_v}"
        self._aborting = self.consecutive_nonfinite >= self.cfg.train.max_nonfinite_steps
        dom_sum_v, dom_cnt_v = red[1 : 1 + n_dom], red[1 + n_dom : 1 + 2 * n_dom]
        stats = {
            "step": pending.step, "loss": loss_v, "grad_norm": gnorm_v, "lr": pending.lr, "finite": finite,
            "domain_loss": {d: (dom_sum_v[i] / dom_cnt_v[i] if dom_cnt_v[i] > 0 else None) for i, d in enumerate(self.domains)},
            "label_tokens": int(n_tokens), "data_time_s": pending.data_time, "host_wait_s": wait,
            "tokens_seen": pending.tokens_seen,
        }
        self.log_step(stats, (ended if ended is not None else time.perf_counter()) - pending.started)

    def log_step(self, stats: Dict[str, Any], step_time: float) -> None:
        step = stats["step"]
        if step % self.cfg.log.every_steps and step != self.cfg.train.max_steps:
            return
        tokens_per_s = self.cfg.train.global_batch_tokens / step_time
        metrics: Dict[str, Any] = {
            "step": step, "loss": stats["loss"], "lr": stats["lr"], "grad_norm": stats["grad_norm"],
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / self.backend.num_devices,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak, self.backend.num_devices),
            "step_time_s": step_time, "data_time_s": stats["data_time_s"], "host_wait_s": stats["host_wait_s"],
            "tokens_seen": stats["tokens_seen"], "label_tokens": stats["label_tokens"],
            "skipped_steps": self.skipped_steps,
        }
        metrics.update({f"loss/{d}": v for d, v in stats["domain_loss"].items()})
        metrics.update({f"data/{k}": v for k, v in self.loader.stats().items()})
        metrics.update(self.backend.memory_stats())
        self.logger.log_step(metrics)
