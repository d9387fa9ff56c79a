"""`lemur-train` under torch_xla with measurements: python xla_driver.py RESULTS.json [overrides...]

Runs the real entry point (lemur_torch.train.main) and records, at the end of every optimizer step (after the
backend's step_done and a wait for the device), torch_xla's compile and execution counts, and the same after every
validation micro-batch (eval_step_done) under "evals", with the number of steps done by then; the order in which
steps' forward/backward is traced ("backward"), steps are dispatched ("dispatch") and their metrics read by the
trainer ("read"): the "events"; the persistent compilation cache's lookups; and which module runs the decoder
layers. If the run exports at the end, it also records the trained XLA model's logits on a fixed packed batch
(LOGITS_BATCH) next to RESULTS.json, for the main-lane check of the HF export, and the compiles and executions
the export itself caused.
"""

from __future__ import annotations

import json
import os
import sys


def logits_batch():
    """A fixed packed batch: 4 rows (one per fsdp device), two documents per row, 32 tokens."""
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 32000, (4, 32), generator=g)
    pos = torch.cat([torch.arange(12), torch.arange(20)]).repeat(4, 1)
    return {"input_ids": ids, "position_ids": pos}


def main() -> int:
    results_path, overrides = sys.argv[1], sys.argv[2:]
    import torch
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    from lemur_torch import train
    from lemur_torch.parallel.xla.backend import XlaSpmdBackend
    from lemur_torch.trainer import Trainer

    steps, evals, events, extra = [], [], [], {}
    step_done, eval_step_done = XlaSpmdBackend.step_done, XlaSpmdBackend.eval_step_done

    def compiles():
        return met.counter_value("UncachedCompile") or 0

    def executions():
        return met.counter_value("ExecuteReplicated") or met.counter_value("ExecuteComputation") or 0

    def counts():
        return {"compiles": compiles(), "executions": executions()}

    def measured_step_done(self):
        events.append(["dispatch", len(steps) + 1])
        step_done(self)
        xm.wait_device_ops()
        steps.append(counts())

    def measured_eval_step_done(self):
        eval_step_done(self)
        xm.wait_device_ops()
        evals.append({"after_step": len(steps), **counts()})

    XlaSpmdBackend.step_done = measured_step_done
    XlaSpmdBackend.eval_step_done = measured_eval_step_done

    clip = XlaSpmdBackend.clip_grad_norm_

    def recorded_clip(self, model, max_norm):  # the trainer clips once the step's forward/backward is traced
        events.append(["backward", len(steps) + 1])
        return clip(self, model, max_norm)

    XlaSpmdBackend.clip_grad_norm_ = recorded_clip

    apply_guard = Trainer.apply_guard

    def recorded_read(self, step, metrics):  # a step's guard is applied as soon as its metrics are read
        events.append(["read", step])
        return apply_guard(self, step, metrics)

    Trainer.apply_guard = recorded_read

    setup_model = XlaSpmdBackend.setup_model

    def recorded_setup_model(self, cfg, init_weights=True):
        model = setup_model(self, cfg, init_weights)
        extra["layers"] = type(model.module.model.layers).__name__
        return model

    XlaSpmdBackend.setup_model = recorded_setup_model

    export_model = train.export_model  # the name train.py calls

    def export_and_record_logits(backend, model, cfg, tokenizer, out_dir):
        before = (compiles(), executions(), met.counter_value("ReplicateShardedData") or 0)
        out = export_model(backend, model, cfg, tokenizer, out_dir)
        extra["export"] = {
            "compiles": compiles() - before[0],
            "executions": executions() - before[1],
            "replications": (met.counter_value("ReplicateShardedData") or 0) - before[2],
        }
        batch = next(backend.device_batches(iter([logits_batch()])))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        torch.save({"batch": logits_batch(), "logits": logits.float().cpu()}, results_path + ".logits.pt")
        return out

    train.export_model = export_and_record_logits
    status = train.main(overrides)
    extra["cache"] = {
        name: met.counter_value(f"PersistentCache{name}") or 0 for name in ("Hit", "Miss", "DeserializeFailure")
    }
    with open(results_path, "w") as f:
        json.dump({"status": status, "steps": steps, "evals": evals, "events": events, **extra}, f)
    return status


if __name__ == "__main__":
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    sys.exit(main())
