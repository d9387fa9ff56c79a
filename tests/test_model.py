"""Model build, loss and per-document masking against transformers' own references."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker

from lemur_torch.config import load_config
from lemur_torch.model import build_meta_model, count_params, flops_per_token, init_weights, token_loss_sums


def _tiny_model(seed=0):
    cfg = load_config(["model=tiny"])
    model = build_meta_model(cfg.model)
    model.to_empty(device="cpu")
    from lemur_torch.model import reset_rope_buffers

    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, seed, cfg.model.initializer_range)
    return model.eval(), cfg


def test_count_params_matches_built_model():
    for name in ("tiny", "llama2_70b"):
        cfg = load_config([f"model={name}"])
        model = build_meta_model(cfg.model)
        assert count_params(cfg.model) == sum(p.numel() for p in model.parameters()), name


def test_flops_per_token_70b_matches_recipe():
    cfg = load_config(["model=llama2_70b"])
    assert abs(flops_per_token(cfg.model, 4096) - 4.46e11) / 4.46e11 < 0.01


def test_rope_buffers_match_a_freshly_built_model():
    model, cfg = _tiny_model()
    from transformers import LlamaForCausalLM

    from lemur_torch.model import hf_llama_config

    ref = LlamaForCausalLM(hf_llama_config(cfg.model))
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)


def test_loss_sum_equals_hf_loss():
    model, _ = _tiny_model()
    ids = torch.randint(3, 32000, (2, 48))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, use_cache=False)
        s, dsum, dcnt = token_loss_sums(out.logits, labels, torch.zeros_like(ids), 1, chunk=7)
    n = (labels[:, 1:] != -100).sum()
    assert torch.allclose(s / n, out.loss, atol=1e-5)
    assert dcnt[0] == n and torch.allclose(dsum[0], s)


def test_packed_row_loss_equals_documents_alone():
    """Per-document masking from position_ids: the packed row's loss = token-weighted loss of each doc alone."""
    model, _ = _tiny_model()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 32000, (n,), generator=g) for n in (17, 30, 11)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    start = 0
    for d in docs:  # first token of each document: no loss
        labels[0, start] = -100
        start += len(d)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        s_packed, _, _ = token_loss_sums(packed, labels, torch.zeros_like(ids), 1, chunk=1024)
        alone_sum, alone_n = 0.0, 0
        for d in docs:
            logits = model(input_ids=d[None], use_cache=False).logits
            alone_sum += F.cross_entropy(logits[0, :-1], d[1:], reduction="sum")
            alone_n += len(d) - 1
        # without position_ids the documents attend to each other: the loss must differ
        mixed = model(input_ids=ids, use_cache=False).logits
        s_mixed, _, _ = token_loss_sums(mixed, labels, torch.zeros_like(ids), 1, chunk=1024)
    n = (labels[:, 1:] != -100).sum()
    assert torch.allclose(s_packed / n, alone_sum / alone_n, atol=1e-5)
    assert not torch.allclose(s_mixed / n, alone_sum / alone_n, atol=1e-3)


def test_per_domain_sums():
    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[1, 2, 3, -100, 5, 6]])
    domains = torch.tensor([[0, 0, 1, 1, 1, 0]])
    s, dsum, dcnt = token_loss_sums(logits, labels, domains, 2, chunk=2)
    per_tok = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    assert torch.allclose(dsum, torch.stack([per_tok[0] + per_tok[4], per_tok[1] + per_tok[3]]))
    assert dcnt.tolist() == [2.0, 2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_gradient_equals_cross_entropys(dtype):
    """The chunked loss's own backward against autograd through F.cross_entropy (fp32, unchunked) on the same
    logits: the same loss sum and gradient (bf16 logits: within the rounding of the bf16 gradient)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 300, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 300, (2, 50), generator=g)
    labels[0, :5] = -100
    labels[1, 30] = -100
    s, _, _ = token_loss_sums(logits, labels, torch.zeros_like(labels), 1, chunk=7)
    s.backward()
    ref = logits.detach().float().requires_grad_()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    expected = F.cross_entropy(ref.reshape(-1, 300), targets.reshape(-1), ignore_index=-100, reduction="sum")
    expected.backward()
    assert logits.grad.dtype == dtype
    assert torch.allclose(s, expected, rtol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # bf16 keeps 8 bits of a gradient below 1 in magnitude
    assert torch.allclose(logits.grad.float(), ref.grad, atol=tol, rtol=0)


def test_loss_keeps_one_fp32_chunk_of_the_logits():
    """The loss's forward and backward on bf16 logits [B, S, V], measured with torch's memory tracker: the logits
    and their gradient (2 bytes each per element) plus one chunk's fp32 copy, never every chunk's. Chunking
    saves exactly the fp32 [B, S - chunk, V] that the unchunked loss holds at once."""
    B, S, V, chunk = 2, 512, 4096, 64

    def peak(chunk_len: int) -> int:
        logits = torch.randn(B, S, V, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
        labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
        tracker = MemTracker()
        with tracker:
            s, _, _ = token_loss_sums(logits, labels, torch.zeros_like(labels), 1, chunk_len)
            s.backward()
        return sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())

    chunked, whole = peak(chunk), peak(S)
    # the bf16 logits and gradient, one fp32 chunk, and [B, S] per-token values (losses, log-sum-exps, targets)
    bound = 2 * B * S * V + 2 * B * S * V + 4 * B * chunk * V + 64 * B * S
    assert chunked <= bound
    # autograd through the plain ops would keep every chunk's fp32 copy (4 B S V) on top of the logits
    assert chunked < 2 * B * S * V + 4 * B * S * V
    assert abs(whole - chunked - 4 * B * (S - chunk) * V) <= 64 * B * S
