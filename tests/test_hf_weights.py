"""HF safetensors read by byte range (lemur_torch.weights), as each TPU host reads its starting weights: the
rows it asks for equal safetensors' own tensors, from a folder or from a non-local fsspec URL, and a host that
reads its 1/H share of the rows of every tensor reads 1/H of the bytes (byte counters), never the model."""

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from lemur_torch import weights as hf_weights


@pytest.fixture
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(64, 16, generator=g).to(torch.bfloat16),
            "model.norm.weight": torch.randn(16, generator=g),
        },
        str(tmp_path / "model-00001-of-00002.safetensors"),
        metadata={"format": "pt"},
    )
    save_file(
        {
            "lm_head.weight": torch.randn(64, 16, generator=g).half(),
            "model.layers.0.mlp.down_proj.weight": torch.randn(16, 48, generator=g),
        },
        str(tmp_path / "model-00002-of-00002.safetensors"),
    )
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    return tmp_path


def _reference(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_rows_equal_safetensors_tensors(folder):
    ref = _reference(folder)
    w = hf_weights.SafetensorsFolder(str(folder))
    assert sorted(w.keys()) == sorted(ref)
    assert w.read_json("config.json") == {"hidden_size": 16}
    for name, t in ref.items():
        assert w.shape(name) == tuple(t.shape)
        assert torch.equal(w.rows(name), t)
        assert torch.equal(w.rows(name, 3, 11), t[3:11]) and w.rows(name, 3, 11).dtype == t.dtype
        assert w.rows(name, 5, 5).shape == (0, *t.shape[1:])
    with pytest.raises(KeyError, match="model.pretrained=.* has no tensor 'missing'"):
        w.rows("missing")


def test_reads_a_url_without_local_files(folder):
    """gs:// and hf:// go through the same fsspec calls; the in-memory filesystem stands in for them."""
    mem = fsspec.filesystem("memory")
    for f in folder.iterdir():
        mem.pipe(f"/ckpt/{f.name}", f.read_bytes())
    w = hf_weights.SafetensorsFolder("memory://ckpt")
    for name, t in _reference(folder).items():
        assert torch.equal(w.rows(name, 1, 7), t[1:7])
    assert w.read_json("config.json") == {"hidden_size": 16}


@pytest.mark.parametrize("hosts", [2, 4, 8])
def test_each_host_reads_its_share_of_the_bytes(folder, hosts):
    ref = _reference(folder)
    rows_tensors = {n: t for n, t in ref.items() if t.shape[0] % hosts == 0 and t.dim() == 2 and t.shape[0] >= 16}
    total = sum(t.numel() * t.element_size() for t in rows_tensors.values())
    headers = hf_weights.SafetensorsFolder(str(folder)).bytes_read  # the two headers, read once per host
    for h in range(hosts):
        w = hf_weights.SafetensorsFolder(str(folder))
        for name, t in rows_tensors.items():
            n = t.shape[0] // hosts
            assert torch.equal(w.rows(name, h * n, (h + 1) * n), t[h * n : (h + 1) * n])
        assert w.bytes_read - headers == total // hosts


def test_pretrained_location(tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert hf_weights.pretrained_location(str(tmp_path)) == str(tmp_path)
    assert hf_weights.pretrained_location("gs://bucket/Llama-2-70b-hf") == "gs://bucket/Llama-2-70b-hf"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # a hub id is read by range from the hub itself: nothing downloaded to the boot disk
    assert hf_weights.pretrained_location("meta-llama/Llama-2-70b-hf") == "hf://meta-llama/Llama-2-70b-hf"
