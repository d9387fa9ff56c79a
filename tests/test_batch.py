"""The batch contract as types (lemur_torch/batch.py): the loaders the trainer is given and the one fake the tests
and benchmarks share satisfy the Loader protocol, and their batches carry the contract's keys and shapes."""

import pytest
import torch
from fakes import ListLoader, random_batches

from lemur_torch.batch import Batch, Loader, document_lengths
from lemur_torch.config import load_config
from lemur_torch.data import build_loader
from lemur_torch.tokenizer import build_tokenizer


def check_batch(batch, B, S):
    assert set(batch) == set(Batch.__annotations__), sorted(batch)
    for key, value in batch.items():
        assert value.shape == (B, S), key
    assert batch["doc_lens"].dtype == torch.int32 and torch.equal(
        batch["doc_lens"], document_lengths(batch["position_ids"])
    )


def test_the_fake_loader_is_a_loader():
    loader = ListLoader(random_batches(2, 16, n=3))
    assert isinstance(loader, Loader)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    mark = loader.mark()
    after = next(it)
    loader.rewind(mark)
    assert next(it) is after, "rewind goes back to the mark: the next batch comes again"
    state = loader.state_dict()
    again = ListLoader(loader.batches)
    again.load_state_dict(state)
    assert next(iter(again)) is next(it) and first[0] is not first[1]
    check_batch(first[0], 2, 16)
    assert not isinstance(object(), Loader), "the protocol has members to check"


@pytest.mark.parametrize("overrides", [[], ["data=sample_chat", "model.vocab_size=32064"]], ids=["pretrain", "chat"])
def test_the_real_loaders_are_loaders(overrides):
    cfg = load_config(overrides)
    loader = build_loader(cfg.data, build_tokenizer(cfg.data), 96, 2, 0, 1, 0)
    assert isinstance(loader, Loader)
    check_batch(next(iter(loader)), 2, 96)
