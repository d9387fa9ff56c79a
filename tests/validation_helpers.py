"""Shared by the validation tests of both lanes (no imports beyond torch and lemur_torch): a host stand-in for the
backend, and the tiny model with the run's initial weights."""

import torch


class HostBackend:
    """What Validator needs of a backend, in one process on the CPU: simulated data-parallel rank `dp_rank` of
    `dp_size`. all_reduce_sum keeps the local sums in `reduced` (tests add the simulated ranks' up themselves)."""

    device = torch.device("cpu")
    rank = 0

    def __init__(self, dp_rank=0, dp_size=1):
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.reduced = None

    def device_batches(self, batches):
        from lemur_torch.attention import with_varlen_boundaries

        for batch in batches:  # as the FSDP backend does, on the host: the boundaries for the attention kernel
            yield with_varlen_boundaries(batch)

    def all_reduce_sum(self, t):
        self.reduced = t.clone()
        return t

    def eval_step_done(self):
        pass

    def broadcast_object(self, obj):
        return obj


def tiny_model(cfg):
    """cfg.model on the CPU, initialised as every backend initialises it (init_weights with cfg.train.seed)."""
    from lemur_torch.model import build_meta_model, init_weights, reset_rope_buffers

    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, cfg.train.seed, cfg.model.initializer_range)
    return model
