"""The checkpoint's sha256 (A1111's model hash) computed on a thread while the models load:
hashlib releases the GIL, so reading and hashing the file costs the start-up nothing until
someone asks for the hash (and waits for it then)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .checkpoint import file_sha256, remember_if_unchanged


class BackgroundHash:
    """Hashes ``path`` on a thread as soon as it is made; ``result()`` waits for it. The digest
    is recorded in ``memo`` (the hash memo) when the file did not change while it was read."""

    def __init__(self, path: Path, memo: Path | None):
        self.path = Path(path).resolve()
        self.memo = memo
        self._digest: str | None = None
        self._error: BaseException | None = None
        # A daemon: a process that never asks for the hash does not wait for it at exit.
        self._thread = threading.Thread(target=self._run, name="sdterm-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            before = os.stat(self.path)
            self._digest = file_sha256(self.path)
            remember_if_unchanged(self.path, before, self._digest, self.memo)
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
