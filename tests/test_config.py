"""Config composition and validation: bad configs fail before any model is built, naming the key."""

import subprocess
import sys

import pytest

from lemur_torch.config import ConfigError, load_config, validate
from lemur_torch.model import count_params


def test_defaults_compose_and_validate():
    cfg = load_config([])
    validate(cfg, world_size=1)
    assert cfg.run_name == "smoke" and cfg.model.name == "tiny"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.no_such_key=1"], "train.no_such_key"),  # unknown key
        (["train.max_steps=lots"], "train.max_steps"),  # wrong type
        (["train.global_batch_tokens=1000"], "train.global_batch_tokens"),  # not divisible
        (["model.attention=flash_attention_2"], "model.attention"),  # no CUDA / flash-attn here
        (["parallel.activation_checkpointing=some"], "parallel.activation_checkpointing"),
    ],
)
def test_bad_config_names_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        validate(load_config(overrides), world_size=1)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_indivisible_batch_depends_on_world_size():
    cfg = load_config(["train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_tokens=384"])
    validate(cfg, world_size=1)  # 384 = 3 x (2 x 64)
    with pytest.raises(ConfigError, match="train.global_batch_tokens"):
        validate(cfg, world_size=2)  # 384 is not a multiple of 2 x 64 x 2


def test_cli_config_error_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lemur_torch.train", "optim.betas=oops"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.betas" in lines[0], proc.stderr


def test_model_groups_match_llama2_parameter_counts():
    # published sizes of the HF Llama-2 checkpoints (RECIPE.md: 70B = 68.98e9)
    expected = {"llama2_7b": 6.738e9, "llama2_13b": 13.016e9, "llama2_70b": 68.977e9}
    for name, count in expected.items():
        cfg = load_config([f"model={name}"])
        assert abs(count_params(cfg.model) - count) / count < 1e-3, name


def test_lemur_70b_experiment_has_paper_values():
    cfg = load_config(["experiment=lemur_70b_pretrain"])
    assert cfg.train.seq_len == 4096 and cfg.train.global_batch_tokens == 1024 * 4096
    assert cfg.optim.lr == 4e-5 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.warmup_steps == 2000
    assert cfg.train.grad_clip == 1.0 and cfg.optim.schedule == "cosine"
    validate(cfg, world_size=512)
