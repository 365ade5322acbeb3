"""The checkpoint's sha256 (A1111's model hash) computed on a thread while the models load:
hashlib releases the GIL, so reading and hashing the file costs the start-up nothing until
someone asks for the hash (and waits for it then).

``begin`` starts one as early as the caller knows the file (the command line: before it imports
torch, so the hash runs beside the imports); the models find it with ``running`` instead of
hashing the file again. No torch here."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from .file_hash import file_sha256, recall_sha256, remember_if_unchanged, version


class BackgroundHash:
    """Hashes ``path`` on a thread as soon as it is made; ``result()`` waits for it. The digest
    is recorded in ``memo`` (the hash memo) when the file did not change while it was read.

    ``compute(path)``: another digest of the file than its sha256, recorded as ``field``."""

    def __init__(self, path: Path, memo: Path | None, *, compute: Callable[[Path], str] | None = None,
                 field: str = "sha256"):
        self.path = Path(path).resolve()
        self.memo = memo
        self._compute, self._field = compute, field
        self._digest: str | None = None
        self._error: BaseException | None = None
        # A daemon: a process that never asks for the hash does not wait for it at exit.
        self._thread = threading.Thread(target=self._run, name=f"sdterm-hash-{field}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            before = os.stat(self.path)
            self._digest = (self._compute or file_sha256)(self.path)
            remember_if_unchanged(self.path, before, self._digest, self.memo, self._field)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


_begun: dict[tuple, BackgroundHash] = {}
_lock = threading.Lock()


def _identity(path: str | os.PathLike) -> tuple:
    """The file as it is now: its real path, size, mtime and inode (a changed file is another)."""
    p = Path(path).expanduser().resolve()
    return (str(p), *version(os.stat(p)))


def begin(path: str | os.PathLike, memo: Path | None) -> BackgroundHash | None:
    """Start hashing the file ``path`` now, unless the memo knows its digest or it is being hashed
    already; None when there is nothing to do (or the file can't be read: its loader says so)."""
    try:
        if not Path(path).expanduser().is_file() or recall_sha256(Path(path).expanduser(), memo) is not None:
            return None
        key = _identity(path)
    except OSError:
        return None
    with _lock:
        if key not in _begun:
            _begun[key] = BackgroundHash(Path(key[0]), memo)
        return _begun[key]


def running(path: str | os.PathLike) -> BackgroundHash | None:
    """The hash ``begin`` started for this very file (same path, size, mtime and inode), if any."""
    try:
        key = _identity(path)
    except OSError:
        return None
    with _lock:
        return _begun.get(key)
