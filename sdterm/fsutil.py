"""Small file helpers shared by everything that writes the user's files: atomic, never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see the old file or the new one, never a torn one; a crash leaves at most a stray
    ``.tmp`` file, which is never mistaken for the real one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def exclusive_publish(tmp: Path, make_name, start: int, attempts: int = 10000) -> Path:
    """Give the finished file ``tmp`` the first free name ``make_name(n)`` for n >= start.

    ``os.link`` fails if the name exists, so two processes can never overwrite each other's image;
    the temporary name is removed afterwards.
    """
    try:
        for n in range(start, start + attempts):
            final = make_name(n)
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError:  # a filesystem without hard links: exclusive create, then copy
                try:
                    with open(final, "xb") as out, open(tmp, "rb") as src:
                        out.write(src.read())
                except FileExistsError:
                    continue
            return final
        raise FileExistsError(f"no free output name after {attempts} tries in {tmp.parent}")
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
