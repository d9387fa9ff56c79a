"""The FSDP backend with float8, as a subclass, until the backend carries float8 itself.

PHASE B folds these into parallel/fsdp.py (and the trainer's summary), and this file goes away:
1. apply_fsdp: `float8.convert(model, plan, all_gather=shard)` right after `shard` is decided, before the layer
   loop (so before activation checkpointing, compile and fully_shard), with `plan` from
   `float8.select_for_device(cfg.parallel.float8, device, backend name)` chosen in FsdpBackend.__init__;
2. FsdpBackend.optimizer_step: `conversion.after_optimizer_step(model)` after the step (the tensorwise float8
   all-gather's scales, one all-reduce for all layers);
3. FsdpBackend.state_dict_for_checkpoint and export_hf: `float8.plain_state_dict` on the model's state dict, so
   checkpoints and exports hold plain tensors (tensorwise's weights are torchao wrappers; raw, DCP would pickle
   the wrapper class into the checkpoint and safetensors refuses them);
4. the start-of-run summary: a `float8` row with `conversion.describe()`.
"""

from __future__ import annotations

from typing import Any, Dict

from lemur_torch.parallel import float8
from lemur_torch.parallel.fsdp import FsdpBackend


class Float8FsdpBackend(FsdpBackend):
    """FsdpBackend plus float8 `recipe` (none | tensorwise | rowwise | mxfp8), chosen for this device."""

    def __init__(self, cfg, recipe: str):
        super().__init__(cfg)
        self.float8_plan = float8.select_for_device(recipe, self.device, self.name)
        self.float8 = float8.Float8Conversion(self.float8_plan)
        self.model = None

    def parallelize(self, model, p) -> None:
        shard = self.mesh.size() > 1 or self.mp_policy.param_dtype is not None  # apply_fsdp's rule
        self.float8 = float8.convert(model, self.float8_plan, all_gather=shard)
        super().parallelize(model, p)
        self.model = model

    def optimizer_step(self, optimizer, finite) -> None:
        super().optimizer_step(optimizer, finite)
        self.float8.after_optimizer_step(self.model)

    def state_dict_for_checkpoint(self, model, optimizer) -> Dict[str, Any]:
        state = super().state_dict_for_checkpoint(model, optimizer)
        state["model"] = float8.plain_state_dict(state["model"])
        return state
