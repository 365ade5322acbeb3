"""The model cache's folder as ``sdterm cache`` sees it: how many packs and bytes, which are stale
(their checkpoint changed or is gone), and clearing them. Eviction of all but the most recently
used packs happens when a pack is written (``pack_format.evict``)."""

from __future__ import annotations

from pathlib import Path

from ...fsutil import close_quietly, open_for_reading, remove_quietly
from .pack_format import PackError, identity, pack_files, read_header, temp_files


def stale(path: Path) -> bool:
    """True when the pack can never be used: unreadable, or its checkpoint changed or is gone."""
    try:
        fd = open_for_reading(path)
    except OSError:
        return True
    try:
        header, _ = read_header(fd)
        key = header["key"]
        return identity(Path(key["identity"]["path"])) != key["identity"]
    except (PackError, OSError, KeyError, TypeError):
        return True
    finally:
        close_quietly(fd)


def prune(folder: Path, *, temp_age: float = 3600.0) -> int:
    """Delete stale packs and temporary files older than ``temp_age`` seconds (a write that a
    killed process left behind); how many were deleted."""
    import time

    removed = 0
    for p in pack_files(folder):
        if stale(p):
            remove_quietly(p)
            removed += 1
    for p in temp_files(folder):
        try:
            if time.time() - p.stat().st_mtime > temp_age:
                p.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def clear(folder: Path) -> int:
    """Delete every pack (and leftover temporary file); how many."""
    files = pack_files(folder) + temp_files(folder)
    for p in files:
        remove_quietly(p)
    return len(files)


def stats(folder: Path) -> tuple[int, int]:
    """(packs, bytes) in the folder."""
    count = size = 0
    for p in pack_files(folder):
        try:
            size += p.stat().st_size
            count += 1
        except OSError:
            pass
    return count, size
