"""The attention contract, from the loader's documents to the kernel, for sdpa, flex and flash.

References are independent of the code under test: each document run alone through transformers' own eager
attention (unpacked), the documents' token lengths from the tokenizer called per document, and the peak
FLOP/s of the vendors' datasheets. GPU kernels are replaced by the CPU reference kernels with their
signatures (the seam `lemur_torch.attention.find_kernel`); FlexAttention's compiled kernel runs for real on
CPU in the forward-only checks (it has no CPU backward).
"""

import json
import logging
import os
import re
import sys
import types

import pytest
import torch
from conftest import train_in_process
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from lemur_torch import attention
from lemur_torch.batch import document_ids, document_lengths, row_document_ids, varlen_boundaries
from lemur_torch.config import load_config, validate
from lemur_torch.data.schema import DataConfig
from lemur_torch.errors import ConfigError
from lemur_torch.model import build_meta_model, hf_llama_config, init_weights, reset_rope_buffers

S = 64
# row 0: three documents; row 1: a single document; row 2: a one-token document first
DOCS = [[20, 30, 14], [64], [1, 4, 59]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, like the subprocess runs (conftest): the tiny model gains nothing from two, and on
    a busy 2-core machine two threads run it several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positions(rows):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def tiny_model(selection):
    cfg = load_config(["model=tiny"])
    model = build_meta_model(cfg.model)
    attention.install(model, selection)
    model.to_empty(device="cpu")
    reset_rope_buffers(model, torch.device("cpu"))
    init_weights(model, 5, cfg.model.initializer_range)
    return model.eval()


def eager_reference(model):
    """transformers' own model and eager attention, with the same weights (copied, not re-initialised)."""
    ref = LlamaForCausalLM(hf_llama_config(load_config(["model=tiny"]).model))
    ref.load_state_dict(model.state_dict())
    ref.config._attn_implementation = "eager"
    return ref.eval()


class Recorder:
    """A kernel wrapper that records what the kernel is given."""

    def __init__(self, kernel):
        self.calls = []
        self.kernel = attention.Kernel(kernel.key, kernel.name, self, kernel.dtypes)
        self._fn = kernel.fn

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        self.calls.append(
            {
                "cu_q": cu_q.tolist(),
                "cu_k": cu_k.tolist(),
                "max_q": max_q,
                "max_k": max_k,
                "dtype": cu_q.dtype,
                "q": tuple(q.shape),
                "k": tuple(k.shape),
                **kw,
            }
        )
        return self._fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


SELECTIONS = {
    "sdpa": lambda: attention.Selection("sdpa", None, "sdpa"),
    "flex": lambda: attention.Selection("flex", attention.COMPILED_FLEX, "flex"),  # the real compiled kernel
    "flash": lambda: attention.Selection("flash", Recorder(attention.VARLEN_REFERENCE).kernel, "flash"),
}


@pytest.fixture(scope="module")
def packed():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 32000, (len(DOCS), S), generator=g)


@pytest.mark.parametrize("batch_size", [1, 3])
# flex: torch.compile's first build of the kernel takes seconds
@pytest.mark.parametrize("impl", ["sdpa", pytest.param("flex", marks=pytest.mark.slow), "flash"])
def test_packed_logits_equal_documents_alone(impl, batch_size, packed):
    rows = DOCS[:batch_size]
    ids, pos = packed[:batch_size], positions(rows)
    model = tiny_model(SELECTIONS[impl]())
    ref = eager_reference(model)
    batch = attention.with_varlen_boundaries({"input_ids": ids, "position_ids": pos, "doc_lens": document_lengths(pos)})
    with torch.no_grad():
        got = model(**attention.forward_kwargs(batch)).logits
        for b, row in enumerate(rows):
            start = 0
            for n in row:
                alone = ref(input_ids=ids[b : b + 1, start : start + n], use_cache=False).logits[0]
                err = (got[b, start : start + n] - alone).abs().max().item()
                assert err < 1e-5, (impl, batch_size, b, start, n, err)
                start += n
        # the check can fail: with one document per row the later documents see the earlier ones
        mixed_pos = torch.arange(S).expand(batch_size, S)
        mixed = attention.with_varlen_boundaries(
            {"input_ids": ids, "position_ids": pos, "doc_lens": document_lengths(mixed_pos)}
        )
        wrong = model(**attention.forward_kwargs(mixed)).logits
        assert (wrong[0, 20:] - got[0, 20:]).abs().max() > 1e-3


def test_flash_kernel_gets_flattened_batch_and_unexpanded_kv_heads(packed):
    rec = Recorder(attention.VARLEN_REFERENCE)
    model = tiny_model(attention.Selection("flash", rec.kernel, "flash"))
    pos = positions(DOCS)
    batch = attention.with_varlen_boundaries(
        {"input_ids": packed, "position_ids": pos, "doc_lens": document_lengths(pos)}
    )
    with torch.no_grad():
        model(**attention.forward_kwargs(batch))
    assert len(rec.calls) == model.config.num_hidden_layers
    call = rec.calls[0]
    assert call["cu_q"] == call["cu_k"] == [0, 20, 50, 64, 128, 129, 133, 192]
    assert call["max_q"] == call["max_k"] == 64 and call["dtype"] == torch.int32
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert call["q"] == (3 * S, cfg.num_attention_heads, head_dim)
    assert call["k"] == (3 * S, cfg.num_key_value_heads, head_dim)  # grouped-query: K/V not repeated
    assert call["causal"] is True and call["softmax_scale"] == head_dim**-0.5


# -- the batch contract -----------------------------------------------------------------------------------


def test_document_lengths_and_varlen_form():
    pos = positions(DOCS)
    lens = document_lengths(pos)
    assert lens.dtype == torch.int32 and lens.shape == (3, S)
    for b, row in enumerate(DOCS):
        assert lens[b, : len(row)].tolist() == row and (lens[b, len(row) :] == 0).all()
    cu, longest = varlen_boundaries(lens)
    assert cu.tolist() == [0, 20, 50, 64, 128, 129, 133, 192] and longest == 64 and isinstance(longest, int)
    doc = document_ids(cu, 3, S)
    expect = torch.repeat_interleave(torch.arange(7), torch.tensor([20, 30, 14, 64, 1, 4, 59])).view(3, S)
    assert torch.equal(doc.long(), expect)
    # a continued document restarts at column 0 of the next row: its own segment there
    cont = torch.tensor([[5, 6, 7, 0, 1, 0], [8, 9, 10, 11, 0, 1]])
    assert document_lengths(cont).tolist() == [[3, 2, 1, 0, 0, 0], [4, 2, 0, 0, 0, 0]]
    # attend_across_documents: positions 0..S-1, one document per row
    assert document_lengths(torch.arange(S).expand(2, S))[:, 0].tolist() == [S, S]


def _sample_loader(fmt, batch_size=3):
    from lemur_torch.data import build_loader
    from lemur_torch.tokenizer import build_tokenizer

    cfg = load_config(["data=sample_chat", "model.vocab_size=32064"] if fmt == "chat" else [])
    tok = build_tokenizer(cfg.data)
    return build_loader(cfg.data, tok, 96, batch_size, 0, 1, 0)


@pytest.mark.parametrize("fmt", ["pretrain", "chat"])
def test_xla_segments_equal_the_loaders_boundaries(fmt):
    """The torch_xla backend finds documents from position_ids on the device (fixed shapes, no host sync); on
    the loader's batches that is exactly the batch's doc_lens, for packed documents and chat (with padding)."""
    for _i, batch in zip(range(4), _sample_loader(fmt)):
        B, L = batch["input_ids"].shape
        assert batch["doc_lens"].shape == (B, L) and (batch["doc_lens"].sum(1) == L).all()
        ours = document_ids(varlen_boundaries(batch["doc_lens"])[0], B, L)
        xla = row_document_ids(batch["position_ids"])
        assert torch.equal(ours[:, :, None] == ours[:, None, :], xla[:, :, None] == xla[:, None, :])


# -- selection: config errors, auto, kernel discovery --------------------------------------------------------


def _bf16_only_flash(impl, device_type):
    """A simulated CUDA varlen kernel (bf16/fp16 only, like flash-attn's), on this CPU machine."""
    if impl == "flash":
        return attention.Kernel("sim", "simulated flash-attn", attention.varlen_reference, attention.LOW_PRECISION)
    return None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.attention=flash"], "flash needs a CUDA device"),
        (["model.attention=flex"], "FlexAttention has no backward on cpu"),
        (["model.attention=xla_flash"], "parallel.backend=xla_spmd on a TPU"),
        (["model.attention=flash_attention_2"], "expected one of"),  # the enum has no such member
    ],
)
def test_impossible_attention_is_a_one_line_config_error(overrides, needle):
    with pytest.raises(ConfigError) as err:
        validate(load_config(overrides), 1)
    assert err.value.key == "model.attention" and needle in str(err.value) and "\n" not in str(err.value)
    # select also takes the names as strings
    with pytest.raises(ConfigError, match="use model.attention=flash"):
        attention.select("flash_attention_2", "cuda", torch.bfloat16)


def test_flash_with_fp32_parameters_is_a_config_error(monkeypatch):
    monkeypatch.setattr(attention, "find_kernel", _bf16_only_flash)
    with pytest.raises(ConfigError) as err:
        validate(load_config(["model.attention=flash", "parallel.mixed_precision=fp32"]), 1)
    assert err.value.key == "model.attention" and "bf16/fp16 only" in str(err.value) and "\n" not in str(err.value)
    validate(load_config(["model.attention=flash", "parallel.mixed_precision=bf16"]), 1)  # the same kernel in bf16


def test_auto_resolution(monkeypatch):
    assert attention.select("auto", "cpu", torch.float32).impl == "sdpa"
    assert attention.select("auto", "TPU", torch.bfloat16).impl == "sdpa"  # Pallas only under the XLA backend
    monkeypatch.setattr(attention, "find_kernel", _bf16_only_flash)
    picked = attention.select("auto", "cuda", torch.bfloat16)
    assert picked.impl == "flash" and picked.summary == "flash (auto: simulated flash-attn)"
    assert attention.select("auto", "cuda", torch.float32).impl == "sdpa"  # the kernel cannot run fp32
    from lemur_torch.parallel.xla import attention as xla_attention

    # under the XLA backend: the mask-free SDPA on other PJRT devices, the Pallas kernel on TPU
    assert xla_attention.implementation_for("auto", "CPU") == xla_attention.SDPA
    assert xla_attention.implementation_for("auto", "TPU") == xla_attention.FLASH
    with pytest.raises(ConfigError, match="xla_flash needs a TPU"):
        xla_attention.implementation_for("xla_flash", "CPU")
    with pytest.raises(ConfigError, match="model.attention"):
        xla_attention.implementation_for("flex", "TPU")


def test_flash_kernel_discovery(monkeypatch):
    """flash-attn when installed, else torch's varlen attention (Ampere+), never on a non-CUDA device."""
    assert attention.find_kernel("flash", "cpu") is None and attention.find_kernel("flex", "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    fake = types.ModuleType("flash_attn")
    fake.__version__, fake.flash_attn_varlen_func = "2.8.3", attention.varlen_reference
    fake.__spec__ = __import__("importlib").machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    k = attention.find_kernel("flash", "cuda")
    assert (
        k.key == "flash_attn"
        and k.name == "flash-attn 2.8.3 flash_attn_varlen_func"
        and k.dtypes == attention.LOW_PRECISION
    )
    monkeypatch.delitem(sys.modules, "flash_attn")
    real_find_spec = __import__("importlib").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a)
    )
    k = attention.find_kernel("flash", "cuda")
    assert k.key == "torch_varlen" and "FlashAttention-2" in k.name
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert attention.find_kernel("flash", "cuda") is None
    assert attention.find_kernel("flex", "cuda") is attention.COMPILED_FLEX


def test_torch_varlen_adapter_maps_flash_attn_arguments(monkeypatch):
    import torch.nn.attention.varlen as varlen

    seen = {}

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        seen.update(kw, max_q=max_q)
        return q

    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn)
    q, kv, cu = torch.zeros(6, 4, 8), torch.zeros(6, 2, 8), torch.tensor([0, 2, 6], dtype=torch.int32)
    attention._torch_varlen(q, kv, kv, cu, cu, 4, 4, softmax_scale=0.5, causal=True)
    assert seen == {"scale": 0.5, "window_size": (-1, 0), "enable_gqa": True, "max_q": 4}


# torch.nn.attention.varlen.varlen_attn as released (read from the torch 2.10.0, 2.11.0 and 2.12.0 wheels)
def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    raise AssertionError("a stand-in: selection must read its signature, never call it")


def varlen_attn_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    raise AssertionError("a stand-in: selection must read its signature, never call it")


def varlen_attn_2_12(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    raise AssertionError("a stand-in: selection must read its signature, never call it")


@pytest.mark.parametrize(
    "stand_in, need",
    [(varlen_attn_2_10, "2.12"), (varlen_attn_2_11, "2.12"), (varlen_attn_2_12, None)],
)
def test_torch_varlen_too_old_is_a_config_error_at_selection(monkeypatch, stand_in, need):
    """A CUDA node without flash-attn falls back to torch's varlen_attn: a torch whose varlen_attn lacks a keyword
    the adapter passes fails when model.attention is resolved, naming the torch it needs; `auto` takes sdpa."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    real_find_spec = __import__("importlib").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a)
    )
    if need is None:
        assert attention.find_kernel("flash", "cuda").key == "torch_varlen"
        assert attention.select("flash", "cuda", torch.bfloat16).impl == "flash"
        assert attention.select("auto", "cuda", torch.bfloat16).impl == "flash"
        return
    assert attention.find_kernel("flash", "cuda") is None
    with pytest.raises(ConfigError) as err:
        attention.select("flash", "cuda", torch.bfloat16)
    line = err.value.one_line()
    assert "\n" not in line and "'model.attention'" in line and f"torch >= {need}" in line, line
    assert "enable_gqa" in line and ("window_size" in line) == (stand_in is varlen_attn_2_10), line
    assert attention.select("auto", "cuda", torch.bfloat16).impl == "sdpa"


# -- peak FLOP/s ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
    ],
)
def test_peak_flops_from_datasheets(device, peak):
    from lemur_torch.metrics import PEAK_FLOPS, peak_flops

    assert peak_flops("auto", device) == peak
    assert all(source for _, _, source in PEAK_FLOPS)


def test_unknown_device_logs_once_how_to_set_peak_flops(caplog):
    from lemur_torch.metrics import mfu, peak_flops

    with caplog.at_level(logging.WARNING, logger="lemur_torch.metrics"):
        assert peak_flops("auto", "Mystery Accelerator 9000") is None
        assert peak_flops("auto", "Mystery Accelerator 9000") is None
    lines = [r.getMessage() for r in caplog.records if "Mystery" in r.getMessage()]
    assert len(lines) == 1 and "MFU unavailable" in lines[0] and "log.peak_flops" in lines[0]
    assert mfu(1000.0, 1e9, None, 8) is None and peak_flops("4e14", "Mystery Accelerator 9000") == 4e14
    with caplog.at_level(logging.WARNING, logger="lemur_torch.metrics"):
        assert peak_flops("auto", "cpu") is None  # no MFU on CPU, and nothing to warn about
    assert not [r for r in caplog.records if "'cpu'" in r.getMessage()]


# -- training through the trainer, in this process ---------------------------------------------------------


def _reference_kernels(impl, device_type):
    return {"flash": attention.VARLEN_REFERENCE, "flex": attention.FLEX_REFERENCE}.get(impl)


def short_docs(path, n=160):
    """Documents of 3 to 25 tokens, so that every 32-token row packs several of them, written as jsonl."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 5 + j) % 12] for j in range(1 + (i * 7) % 12))}) + "\n")
    return {"docs": {"kind": "jsonl", "domain": "text", "path": str(path), "shuffle": False}}


TRAIN = ["train.seq_len=32", "train.global_batch_tokens=96", "train.max_steps=20", "data.lanes=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 steps of 3 rows x 32 tokens of short packed documents, for each implementation and micro-batch size
    (3 micro-batches of 1 row, or 1 of 3 rows, per step)."""
    sources = short_docs(tmp_path_factory.mktemp("data") / "docs.jsonl")
    mp = pytest.MonkeyPatch()
    mp.setattr(attention, "find_kernel", _reference_kernels)
    out = {}
    try:
        for mbs in (1, 3):
            for impl in ("sdpa", "flex", "flash"):
                run_dir = tmp_path_factory.mktemp(f"{impl}{mbs}")
                export = (
                    [
                        "checkpoint.export_at_end=true",
                        f"checkpoint.export_dir={run_dir}/hf",
                        "checkpoint.save_at_end=true",
                    ]
                    if mbs == 3
                    else []
                )
                overrides = [f"model.attention={impl}", f"train.micro_batch_size={mbs}", *TRAIN, *export]
                out[impl, mbs] = (train_in_process(overrides, str(run_dir), sources), str(run_dir))
    finally:
        mp.undo()
    out["sources"] = sources
    return out


@pytest.mark.slow  # `trained`: six twenty-step runs
@pytest.mark.parametrize("mbs", [1, 3])
def test_twenty_steps_same_losses_across_implementations(trained, mbs):
    ref, _ = trained["sdpa", mbs]
    assert sorted(ref) == list(range(1, 21))
    for impl in ("flex", "flash"):
        got, _ = trained[impl, mbs]
        worst = max(abs(got[s] - ref[s]) for s in ref)
        assert worst < 1e-4, (impl, mbs, worst)
    assert ref[20] < ref[1] - 0.5  # it trains
    # on rows that pack several documents each (what the comparison is about)
    from lemur_torch.data import build_loader
    from lemur_torch.tokenizer import load_tokenizer

    cfg = load_config(TRAIN)
    data = {**OmegaConf.to_container(cfg.data), "sources": trained["sources"]}
    loader = build_loader(
        OmegaConf.merge(OmegaConf.structured(DataConfig), data), load_tokenizer("builtin"), 32, 3, 0, 1, 0
    )
    lens = torch.cat([b["doc_lens"] for _, b in zip(range(20), loader)])
    assert (lens > 0).sum(
        1
    ).float().mean() > 2.5  # correct at any micro-batch size: the same global batches give the same losses
    other, _ = trained["sdpa", 3 if mbs == 1 else 1]
    assert max(abs(other[s] - ref[s]) for s in ref) < 1e-4


@pytest.mark.slow  # `trained`: six twenty-step runs
@pytest.mark.parametrize("impl", ["flex", "flash"])
def test_export_names_sdpa_whatever_the_run_used(trained, impl):
    _, run_dir = trained[impl, 3]
    folder = os.path.join(run_dir, "hf")
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["attn_implementation"] == "sdpa"
    assert AutoConfig.from_pretrained(folder)._attn_implementation == "sdpa"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config._attn_implementation == "sdpa"
    # lemur-export of the run's checkpoint, here where the run's kernel does not exist (no stand-in now)
    from lemur_torch.export import main as export_main

    assert export_main([os.path.join(run_dir, "checkpoints", "step_00000020"), os.path.join(run_dir, "offline")]) == 0
    with open(os.path.join(run_dir, "offline", "config.json")) as f:
        assert json.load(f)["attn_implementation"] == "sdpa"


def _docs_jsonl(path):
    """Short documents, one longer than two rows (so some row is a single document), written as jsonl."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [" ".join(words[: 3 + (i * 5) % 11]) for i in range(9)]
    docs.insert(4, " ".join(words * 14))
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


@pytest.mark.parametrize("across", [False, True])
def test_flash_receives_the_loaders_document_boundaries(tmp_path, monkeypatch, capsys, across):
    from lemur_torch.tokenizer import load_tokenizer

    docs = _docs_jsonl(tmp_path / "docs.jsonl")
    tok = load_tokenizer("builtin")
    rec = Recorder(attention.VARLEN_REFERENCE)
    monkeypatch.setattr(attention, "find_kernel", lambda impl, device: rec.kernel if impl == "flash" else None)
    steps, B = 3, 3
    train_in_process(
        [
            "model.attention=flash",
            f"train.micro_batch_size={B}",
            f"train.global_batch_tokens={B * S}",
            f"train.max_steps={steps}",
            "data.lanes=1",
            f"data.attend_across_documents={str(across).lower()}",
        ],
        str(tmp_path / "run"),
        {"docs": {"kind": "jsonl", "domain": "text", "path": str(tmp_path / "docs.jsonl"), "shuffle": False}},
    )
    # the start-of-run summary names the kernel
    assert re.search(
        r"^  attention\s+flash \(CPU reference \(test stand-in for flash_attn_varlen_func\)\)$",
        capsys.readouterr().out,
        re.M,
    )
    # independent expectation: each document tokenized alone (BOS + ids + EOS), in order, cycled, cut in rows
    lengths = [len(tok(d, add_special_tokens=False).input_ids) + 2 for d in docs]
    starts, at = set(), 0
    while at < steps * B * S:
        for n in lengths:
            starts.add(at)
            at += n
    layers = load_config(["model=tiny"]).model.num_hidden_layers
    seen = rec.calls[::layers]  # one call per layer and forward
    assert len(seen) == steps
    single_rows = continued = 0
    for m, call in enumerate(seen):
        cu = [0]
        for r in range(B):
            lo = (m * B + r) * S
            cuts = [0] if across else [0] + [t - lo for t in range(lo + 1, lo + S) if t in starts]
            cu += [c + r * S for c in cuts[1:]] + [(r + 1) * S]
            single_rows += len(cuts) == 1
            continued += lo not in starts
        assert call["cu_q"] == call["cu_k"] == cu, (m, call["cu_q"], cu)
        assert call["max_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    assert single_rows >= 1 and continued >= 1  # the data has both cases
