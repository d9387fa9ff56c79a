"""Validation of a composed config, before anything is built: every bound the schema declares, the
combinations no backend can run, then the rules of the backend the config names (lemur_torch.parallel's
`check_config`: its data-parallel size, the global batch's divisibility, its precision and attention).

Every failure is a ConfigError whose message is one line naming the key. The inputs the config names (data
files, tokenizer, weights, checkpoints) are checked next, by lemur_torch.preflight.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from lemur_torch.config.schema import Config
from lemur_torch.errors import ConfigError
from lemur_torch.fields import check_bounds


def validate(cfg: DictConfig, world_size: int) -> None:
    """Check every value's range (schema bounds) and reject impossible combinations, for a run of `world_size`
    processes; called before any model is built."""
    check_values(cfg)
    # the backends' rules import torch (and the attention kernels): check_values, which lemur-plan runs, does not
    from lemur_torch import parallel

    parallel.check_config(cfg, world_size)
    # last, and here: importing transformers costs a second or two that a config error should not wait for
    from transformers.activations import ACT2FN

    if cfg.model.hidden_act not in ACT2FN:
        raise ConfigError("model.hidden_act", f"unknown activation {cfg.model.hidden_act!r}; Llama uses silu")


def check_values(cfg: DictConfig) -> None:
    """The checks that hold on any machine for any number of processes: every bound, then the combinations of
    values no backend can run. `lemur-plan` runs these (it plans for a machine it is not on)."""
    check_bounds(cfg, Config, "", ConfigError)
    t, m, o = cfg.train, cfg.model, cfg.optim
    if t.preempt_exit_code in (2, 3):
        raise ConfigError(
            "train.preempt_exit_code",
            f"{t.preempt_exit_code} already means a config error (2) or a non-finite "
            "abort (3); the job script must tell a preemption apart: use e.g. 124",
        )
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError(
            "train.seq_len", f"{t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}"
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            "model.num_attention_heads", f"hidden_size {m.hidden_size} does not divide by {m.num_attention_heads} heads"
        )
    if m.num_attention_heads % m.num_key_value_heads:
        raise ConfigError(
            "model.num_key_value_heads",
            f"{m.num_attention_heads} attention heads do not divide by {m.num_key_value_heads} kv heads",
        )
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(
            "model.num_attention_heads",
            f"head size {m.hidden_size // m.num_attention_heads} is odd; rotary embeddings need an even one",
        )
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError("optim.betas", f"needs two values in [0, 1), got {list(o.betas)}; Lemur uses [0.9, 0.95]")
    peak = cfg.log.peak_flops
    if peak != "auto" and not _positive_number(peak):
        raise ConfigError(
            "log.peak_flops",
            f"{peak!r} is neither auto nor a number; give the device's peak FLOP/s, e.g. 989e12 for an H100 SXM",
        )


def _positive_number(text: str) -> bool:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value > 0
