"""Reading a safetensors file's tensors with positioned reads, straight into the tensors that keep
them: no memory map of the file, nothing read but the tensors asked for.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and ``data_offsets`` relative to the end of the header), then the data. A tensor whose dtype
is the target's is read into its destination as it is; one to convert (fp32 -> fp16) goes through
a small per-thread staging buffer a chunk at a time, so neither the file nor a converted copy is
ever held whole (the host memory a load peaks at is the models themselves).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ...fsutil import open_for_reading, pread_full

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CHUNK = 16 << 20
"""Bytes of the source read per step when converting (the staging buffer's size)."""


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute offset of the tensor's bytes in the file."""
    nbytes: int


def read_header(path: Path) -> dict[str, Entry]:
    """The tensors of a safetensors file by name; ValueError for a malformed header (a header
    that promises more bytes than the file has included)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("no header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("header too large")
        raw = f.read(n)
        size = os.fstat(f.fileno()).st_size
    if len(raw) != n:
        raise ValueError("truncated header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    entries: dict[str, Entry] = {}
    base = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"{key}: unsupported dtype")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise ValueError(f"{key}: data offsets out of range")
        entries[key] = Entry(dtype, shape, base + begin, nbytes)
    return entries


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


_staging = threading.local()


def _staging_buffer(nbytes: int) -> torch.Tensor:
    buf = getattr(_staging, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _staging.buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf


class TensorFile:
    """An open safetensors file: ``read_into(key, out)`` reads one tensor into ``out`` (its shape,
    any dtype: converted on the way). Safe to call from several threads at once."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = read_header(path)
        self.fd: int | None = open_for_reading(path)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        entry = self.entries[key]
        if tuple(out.shape) != entry.shape:
            raise ValueError(f"{key}: shape {entry.shape}, asked into {tuple(out.shape)}")
        if not out.is_contiguous():  # a channels-last weight: read as stored, then laid out
            dense = torch.empty(out.shape, dtype=out.dtype)
            self.read_into(key, dense)
            out.copy_(dense)
            return
        if self.fd is None:
            raise ValueError("file closed")
        if out.dtype == entry.dtype:
            if entry.nbytes:
                pread_full(self.fd, byte_view(out), entry.start)
            return
        flat = out.reshape(-1)
        item = entry.dtype.itemsize
        per = max(CHUNK // item, 1)
        staging = _staging_buffer(min(per, flat.numel()) * item)
        for first in range(0, flat.numel(), per):
            count = min(per, flat.numel() - first)
            src = staging[: count * item]
            pread_full(self.fd, byte_view(src), entry.start + first * item)
            flat[first : first + count].copy_(src.view(entry.dtype))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
