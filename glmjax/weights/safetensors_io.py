"""Minimal safetensors reading (memory-mapped, zero-copy) and streaming writing.

glmjax reads the format itself so that every dtype a GLM checkpoint uses (BF16 and F8_E4M3 included) maps
to a numpy view of the file with no copy; `safetensors.numpy` cannot represent bfloat16 or fp8.
Format: 8-byte little-endian header length N, N bytes of JSON header, then the raw tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from glmjax.errors import CheckpointError
from glmjax.files import open_regular

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
# The reference implementation's limit: a header is a few hundred KB even for a 5 GB shard of GLM-5.2.
MAX_HEADER_BYTES = 100 * 2**20


class SafetensorsFormatError(CheckpointError):
    """A file that is not valid safetensors; the message starts with its path."""


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile:
    """A memory-mapped safetensors file: `keys()`, `shape(k)`, `dtype(k)`, `tensor(k)` (a read-only view).

    The header is checked as the reference `safetensors` library checks it: unique names, known dtypes,
    integer shapes and offsets, and byte ranges that tile the data exactly (no overlap, no gap, nothing
    past the end or after the last tensor), so no two tensors alias the same bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_regular(self.path, SafetensorsFormatError) as f:  # a FIFO or directory: error, not a hang
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise SafetensorsFormatError(f"{self.path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(file_size - 8, MAX_HEADER_BYTES):  # a corrupt length must not make us allocate n bytes
                raise SafetensorsFormatError(f"{self.path}: header length {n} exceeds the file size {file_size} "
                                             f"or the {MAX_HEADER_BYTES}-byte limit")
            try:
                header = json.loads(f.read(n), object_pairs_hook=self._unique_keys)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsFormatError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"{self.path}: safetensors header is not a JSON object")
        if not isinstance(header.pop("__metadata__", {}), dict):
            raise SafetensorsFormatError(f"{self.path}: __metadata__ is not a JSON object")
        self._header = header
        self._offset = 8 + n
        self._mmap: np.memmap | None = None
        self._check_entries(file_size - self._offset)

    def _unique_keys(self, pairs: list[tuple[str, object]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
            raise SafetensorsFormatError(f"{self.path}: the header names {dup!r} twice")
        return out

    def _check_entries(self, size: int) -> None:
        ranges = []
        for k, info in self._header.items():
            if not isinstance(info, dict):
                raise SafetensorsFormatError(f"{self.path}: malformed header entry for {k!r}")
            if info.get("dtype") not in DTYPES:
                raise SafetensorsFormatError(f"{self.path}: tensor {k!r} has unsupported dtype {info.get('dtype')}")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(_uint(d) for d in shape):
                raise SafetensorsFormatError(f"{self.path}: tensor {k!r}: shape must be a list of non-negative "
                                             f"integers, got {shape!r}")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
                raise SafetensorsFormatError(f"{self.path}: tensor {k!r}: data_offsets must be two non-negative "
                                             f"integers, got {offsets!r}")
            begin, end = offsets
            need = math.prod(shape) * DTYPES[info["dtype"]].itemsize  # Python ints: no overflow
            if end - begin != need or end > size:
                raise SafetensorsFormatError(f"{self.path}: tensor {k!r} has inconsistent offsets {begin}..{end} "
                                             f"({need} bytes for {shape} {info['dtype']}, {size} data bytes)")
            ranges.append((begin, end, k))
        pos, prev = 0, None
        for begin, end, k in sorted(ranges):
            if begin < pos:
                raise SafetensorsFormatError(f"{self.path}: tensors {prev!r} and {k!r} overlap (bytes {begin}..{pos})")
            if begin > pos:
                raise SafetensorsFormatError(f"{self.path}: {begin - pos} unused bytes before tensor {k!r}")
            pos, prev = end, k
        if pos != size:
            raise SafetensorsFormatError(f"{self.path}: {size - pos} bytes after the last tensor")

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self._header[key]["dtype"]]

    def tensor(self, key: str) -> np.ndarray:
        begin, end = self._header[key]["data_offsets"]
        if begin == end:  # an empty tensor (and a file of only empty ones cannot be memory-mapped)
            return np.empty(self.shape(key), self.dtype(key))
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._offset)
        return self._mmap[begin:end].view(self.dtype(key)).reshape(self.shape(key))


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], *, shapes_dtypes=None,
                      metadata: dict[str, str] | None = None) -> None:
    """Writes tensors one by one. `shapes_dtypes` (name -> (shape, dtype)) lets the header be written before
    the (lazily produced) tensors arrive, so only one tensor is in memory at a time."""
    if shapes_dtypes is None:
        tensors = list(tensors)
        shapes_dtypes = {k: (v.shape, v.dtype) for k, v in tensors}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for k, (shape, dtype) in shapes_dtypes.items():
        dtype = np.dtype(dtype)
        if dtype not in DTYPE_NAMES:
            raise SafetensorsFormatError(f"cannot write {k!r}: dtype {dtype} has no safetensors name")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[k] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, arr in tensors:
            shape, dtype = shapes_dtypes[k]
            arr = np.ascontiguousarray(arr)
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise SafetensorsFormatError(f"{k!r}: got {arr.shape} {arr.dtype}, header says {shape} {dtype}")
            f.write(arr.tobytes())
