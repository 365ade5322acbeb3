"""The model cache's file format and folder, without torch (``sdterm cache`` imports it): the
fixed prefix, the header, the checkpoint identity a pack is keyed by, and the folder's listing and
eviction. ``packed.py`` reads and writes the packs themselves."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

from ...fsutil import pread_full, remove_quietly

MAGIC = b"SDTPACK\x00"
FORMAT = 4  # 2: the U-Net's convolution weights channels-last in half precision; 3: the VAE decoder's too;
# 4: the header after the payload (a model's layout may be added while the others are written)
PREFIX = struct.Struct("<8sIQQI")
"""magic, format, header offset, header length, header crc32."""
PAGE = 4096
PAYLOAD = PAGE
"""Where the payload starts: right after the prefix's page."""
BLOCK = 16 << 20
"""Bytes per checksum: blocks are verified in parallel while they are read."""
SUFFIX = ".pack"
TEMP_PREFIX = ".pack-"
KEEP = 2
"""Packs kept in the folder (the most recently used); each is about the model's size in fp16."""


class PackError(Exception):
    """The pack can't be trusted; the model comes from the checkpoint instead."""


def identity(checkpoint: Path) -> dict:
    """What makes a checkpoint the same file with the same content, as far as stat can tell."""
    p = Path(checkpoint).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}


def pack_path(folder: Path, key: dict) -> Path:
    """One file per checkpoint path, architecture and dtype: a changed checkpoint replaces it."""
    name = json.dumps([key["identity"]["path"], key["architecture"], key["dtype"], key["format"]])
    return folder / (hashlib.sha256(name.encode()).hexdigest()[:24] + SUFFIX)


def blocks(nbytes: int) -> list[tuple[int, int]]:
    return [(at, min(BLOCK, nbytes - at)) for at in range(0, nbytes, BLOCK)] or [(0, 0)]


def align(n: int) -> int:
    return -(-n // PAGE) * PAGE


def read_header(fd: int) -> tuple[dict, int]:
    """(header, payload offset) of an open pack; PackError if it is not a sound one. The file is
    prefix | payload | header: its length must be exactly the header's end."""
    head = bytearray(PREFIX.size)
    try:
        pread_full(fd, memoryview(head), 0)
    except OSError:
        raise PackError("no header") from None
    magic, fmt, at, length, crc = PREFIX.unpack(head)
    if magic != MAGIC or fmt != FORMAT or length > 64 << 20 or at < PAYLOAD:
        raise PackError("not a pack of this format")
    if os.fstat(fd).st_size != at + length:
        raise PackError("length differs from the header's (truncated?)")
    raw = bytearray(length)
    try:
        pread_full(fd, memoryview(raw), at)
    except OSError:
        raise PackError("truncated header") from None
    if zlib.crc32(raw) != crc:
        raise PackError("header checksum")
    try:
        header = json.loads(raw)
        payload = int(header["payload"])
    except (ValueError, KeyError, TypeError):
        raise PackError("header unreadable") from None
    if at != PAYLOAD + payload:
        raise PackError("payload length differs from the header's")
    return header, PAYLOAD


def pack_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    except OSError:
        return []


def temp_files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []


def evict(folder: Path, keep: int = KEEP) -> int:
    """Delete all but the ``keep`` most recently used packs; how many were deleted."""
    def used(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    old = sorted(pack_files(folder), key=used, reverse=True)[keep:]
    for p in old:
        remove_quietly(p)
    return len(old)
