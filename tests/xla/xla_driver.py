"""`lemur-train` under torch_xla with measurements: python xla_driver.py RESULTS.json [overrides...]

Runs the real entry point (lemur_torch.train.main) and records, at the end of every optimizer step (after the
backend's step_done and a wait for the device), torch_xla's compile and execution counts, and the same after every
validation micro-batch (eval_step_done) under "evals", with the number of steps done by then. If the run exports
at the end, it also records the trained XLA model's logits on a fixed packed batch (LOGITS_BATCH) next to
RESULTS.json, for the main-lane check of the HF export.
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

    from lemur_torch import export as export_lib
    from lemur_torch import train
    from lemur_torch.parallel.xla import XlaSpmdBackend

    steps, evals = [], []
    step_done, eval_step_done = XlaSpmdBackend.step_done, XlaSpmdBackend.eval_step_done

    def counts():
        return {
            "compiles": met.counter_value("UncachedCompile") or 0,
            "executions": met.counter_value("ExecuteReplicated") or met.counter_value("ExecuteComputation") or 0,
        }

    def measured_step_done(self):
        step_done(self)
        xm.wait_device_ops()
        steps.append(counts())

    def measured_eval_step_done(self):
        eval_step_done(self)
        xm.wait_device_ops()
        evals.append({"after_step": len(steps), **counts()})

    XlaSpmdBackend.step_done = measured_step_done
    XlaSpmdBackend.eval_step_done = measured_eval_step_done

    export_model = export_lib.export_model

    def export_and_record_logits(backend, model, cfg, tokenizer, out_dir):
        out = export_model(backend, model, cfg, tokenizer, out_dir)
        batch = next(backend.device_batches(iter([logits_batch()])))
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        torch.save({"batch": logits_batch(), "logits": logits.float().cpu()}, results_path + ".logits.pt")
        return out

    export_lib.export_model = export_and_record_logits
    status = train.main(overrides)
    with open(results_path, "w") as f:
        json.dump({"status": status, "steps": steps, "evals": evals}, f)
    return status


if __name__ == "__main__":
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    sys.exit(main())
