"""Digests of a checkpoint file, remembered: the file's sha256 (AUTOMATIC1111's model hash is its
first 10 hex digits) and the text encoder's own digest (the prompt cache's key), kept in the hash
memo per path at the file's size and mtime, so a second start reads neither.

No torch here: the command line starts hashing a checkpoint before it imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

CHUNK = 8 << 20
_memo_lock = threading.Lock()
"""Held while the memo is read, changed and written back (one process's threads; another process
may still race: a lost entry only means hashing again)."""
TEXT_DIGEST = "text_sha256"
"""The memo's field for the text encoder's own digest (``Models.encoder_id``)."""


def file_sha256(path: Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def parts_sha256(path: Path, parts: list[tuple[str, int, int]], chunk: int = CHUNK) -> str:
    """sha256 over ``parts`` of the file, in the order given: each part's label (utf-8, then a
    newline) and then its ``nbytes`` bytes from ``start`` (label, start, nbytes)."""
    from ...fsutil import pread_full

    h = hashlib.sha256()
    buf = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        for label, start, nbytes in parts:
            h.update(label.encode() + b"\n")
            done = 0
            while done < nbytes:
                n = min(chunk, nbytes - done)
                view = memoryview(buf)[:n]
                pread_full(fd, view, start + done)
                h.update(view)
                done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def _of_version(entry, st: os.stat_result) -> bool:
    """Whether the memo's ``entry`` was recorded for the file as ``st`` finds it (size and mtime)."""
    return isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns


def _entry(path: Path, memo_file: Path) -> dict | None:
    """The memo's entry for ``path`` if it was recorded at the file's current size and mtime."""
    st = path.stat()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return None
    entry = memo.get(str(path)) if isinstance(memo, dict) else None
    return entry if _of_version(entry, st) else None


def recall(path: str | os.PathLike, memo_file: Path | None, field: str = "sha256") -> str | None:
    """The digest ``field`` (``sha256``: the file's) ``memo_file`` remembers for ``path`` at its
    current size and mtime, or None (nothing remembered, or the memo is unreadable): never reads
    the file itself."""
    if memo_file is None:
        return None
    entry = _entry(Path(path).resolve(), memo_file)
    digest = entry.get(field) if entry is not None else None
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def recall_sha256(path: str | os.PathLike, memo_file: Path | None) -> str | None:
    return recall(path, memo_file, "sha256")


def remembered_sha256(path: str | os.PathLike, memo_file: Path | None) -> str:
    """sha256 of ``path``, read from ``memo_file`` when path, size and mtime are unchanged.

    Any trouble with the memo (missing, corrupt, unwritable) only means hashing the file again.
    """
    digest = recall_sha256(path, memo_file)
    if digest is not None:
        return digest
    digest = file_sha256(Path(path).resolve())
    if memo_file is not None:
        remember_sha256(path, digest, memo_file)
    return digest


def remember(path: str | os.PathLike, memo_file: Path, **digests: str) -> None:
    """Record ``digests`` (``sha256=``: the file's, verified elsewhere, e.g. by a download) for
    ``path`` at its current size and mtime, beside what the memo holds for that same version of
    the file. Failures to write the memo are ignored."""
    from ...fsutil import atomic_write_bytes

    p = Path(path).resolve()
    st = p.stat()
    with _memo_lock:  # the file's hash and its text encoder's finish on two threads
        try:
            memo = json.loads(memo_file.read_text())
            memo = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            memo = {}
        old = memo.get(str(p))
        memo[str(p)] = {**(old if _of_version(old, st) else {}), **digests, "size": st.st_size,
                        "mtime_ns": st.st_mtime_ns}
        try:
            atomic_write_bytes(memo_file, json.dumps(memo, indent=1, sort_keys=True).encode())
        except OSError:
            pass


def remember_sha256(path: str | os.PathLike, digest: str, memo_file: Path) -> None:
    remember(path, memo_file, sha256=digest)


def version(st: os.stat_result) -> tuple[int, int, int]:
    """What tells one version of a file from the next: its size, mtime and inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def unchanged(path: str | os.PathLike, before: os.stat_result) -> bool:
    """Whether ``path`` is still the file it was at ``before``."""
    return version(before) == version(os.stat(path))


def remember_if_unchanged(path: str | os.PathLike, before: os.stat_result, digest: str, memo_file: Path | None,
                          field: str = "sha256") -> None:
    """Record ``digest``, computed from ``path`` as it was at ``before``, unless the file changed
    since (then the digest may be of neither version)."""
    if memo_file is not None and unchanged(path, before):
        remember(path, memo_file, **{field: digest})


def short_hash(sha256: str) -> str:
    return sha256[:10]
