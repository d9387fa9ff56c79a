"""The safetensors files of an HF checkpoint: read by byte range (`SafetensorsFolder`), and the split of an
export's tensors into output files by size (`shard_files_by_size`).

HF safetensors are read by byte range from any fsspec location: a local or shared folder, `gs://`, `s3://`,
`hf://<repo>` (the hub itself), so that each TPU host reads only the rows of each tensor its own devices
hold, straight into memory: nothing is copied to the boot disk, and no host reads the whole model.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw row-major tensors. `SafetensorsFolder` reads every file's header once (a few KB), then
serves `rows(name, start, stop)`: one ranged read of exactly those rows. A tensor sharded along its first
dimension costs a host its share of the bytes; one sharded along a later dimension costs the whole tensor
(the rows are not contiguous), still one request and one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from typing import Dict, Tuple

import fsspec
import torch

# safetensors dtype names (the format's spec)
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def is_remote(location: str) -> bool:
    return "://" in location


class SafetensorsFolder:
    """The *.safetensors files of an HF checkpoint folder at `location` (a path or an fsspec URL)."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.location)
        self.root = root.rstrip("/")
        files = sorted(f for f in self.fs.ls(self.root, detail=False) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"model.pretrained: no *.safetensors in {location}")
        self.bytes_read = 0
        # name -> (file, dtype, shape, absolute byte offset of the tensor's data)
        self._index: Dict[str, Tuple[str, torch.dtype, Tuple[int, ...], int]] = {}
        for path in files:
            head = self._read(path, 0, 8)
            (n,) = struct.unpack("<Q", head)
            header = json.loads(self._read(path, 8, 8 + n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(
                        f"{location}: tensor {name!r} has dtype {info['dtype']}, which lemur-torch does not read"
                    )
                self._index[name] = (
                    path,
                    _DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    8 + n + info["data_offsets"][0],
                )

    def _read(self, path: str, start: int, stop: int) -> bytes:
        data = self.fs.cat_file(path, start=start, end=stop)
        self.bytes_read += len(data)
        return data

    def read_json(self, name: str) -> dict:
        with self.fs.open(f"{self.root}/{name}") as f:
            return json.load(f)

    def keys(self):
        return self._index.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name)[2]

    def _entry(self, name: str):
        if name not in self._index:
            raise KeyError(f"model.pretrained={self.location} has no tensor {name!r}")
        return self._index[name]

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the first dimension (all of a 0-d tensor), read with one ranged request."""
        path, dtype, shape, offset = self._entry(name)
        if not shape:
            return torch.frombuffer(bytearray(self._read(path, offset, offset + dtype.itemsize)), dtype=dtype).reshape(
                ()
            )
        stop = shape[0] if stop is None else stop
        row_bytes = dtype.itemsize * int(torch.Size(shape[1:]).numel())
        data = self._read(path, offset + start * row_bytes, offset + stop * row_bytes) if stop > start else b""
        return (
            torch.frombuffer(bytearray(data), dtype=dtype).reshape((stop - start, *shape[1:]))
            if data
            else torch.empty((0, *shape[1:]), dtype=dtype)
        )


def shard_files_by_size(state: Dict[str, torch.Tensor], max_shard_size_mb: int) -> Dict[str, int]:
    """Assign tensors to output files 1..N in state-dict order, each file at most max_shard_size_mb (a tensor
    larger than that gets a file of its own)."""
    limit = max_shard_size_mb * 2**20
    mapping: Dict[str, int] = {}
    index, used = 1, 0
    for key, value in state.items():
        size = value.numel() * value.element_size()
        if used and used + size > limit:
            index, used = index + 1, 0
        mapping[key] = index
        used += size
    return mapping
