"""The XLA attention implementations against HF's own, on plain CPU tensors (no XLA runtime needed)."""

import pytest
import torch

from lemur_torch.batch import row_document_ids
from lemur_torch.errors import ConfigError
from lemur_torch.parallel.xla import attention as xla_attention


def test_document_ids_follow_hf_packing_rule():
    from transformers.masking_utils import find_packed_sequence_indices

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 0, 1, 2, 3, 4]])
    assert torch.equal(row_document_ids(pos), find_packed_sequence_indices(pos))


def test_mask_free_sdpa_equals_hf_sdpa_on_packed_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    xla_attention.register()
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (2, 24))
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    model.config._attn_implementation = "sdpa"
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    model.config._attn_implementation = xla_attention.SDPA
    got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # documents do not see each other: the second document alone gives the same logits
    alone = model(input_ids=ids[:, 10:], position_ids=pos[:, 10:], use_cache=False).logits
    torch.testing.assert_close(got[:, 10:], alone, atol=1e-5, rtol=1e-5)


def test_attention_choice():
    # auto: the Pallas flash kernel on TPU, the mask-free SDPA elsewhere
    assert xla_attention.implementation_for("auto", "TPU") == xla_attention.FLASH
    assert xla_attention.implementation_for("auto", "CPU") == xla_attention.SDPA
    assert xla_attention.implementation_for("sdpa", "CPU") == xla_attention.SDPA
    assert xla_attention.implementation_for("xla_flash", "TPU") == xla_attention.FLASH
    with pytest.raises(ConfigError, match="model.attention.*needs a TPU"):
        xla_attention.implementation_for("xla_flash", "CPU")
    with pytest.raises(ConfigError, match="model.attention"):
        xla_attention.implementation_for("flash_attention_2", "TPU")
