"""Small file helpers shared by everything that writes the user's files: atomic, never half-written."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable

# Exclusive create, binary, not inherited by child processes, and never through a planted symlink.
_TEMP_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
               | getattr(os, "O_NOFOLLOW", 0))


def _create_temp(folder: Path, prefix: str, suffix: str, attempts: int = 100) -> tuple[int, Path]:
    """A new file with a random name in ``folder``, open for writing: (descriptor, path).

    Made with mode 0o666, so the kernel applies the process's umask itself, as for any file the user
    creates (``tempfile.mkstemp`` makes 0o600, and reading the umask to widen that means setting it,
    which races with other threads creating files).
    """
    for _ in range(attempts):
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, _TEMP_FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name after {attempts} tries", str(folder))


def _remove_quietly(path: Path | str) -> None:
    """Remove the file ``path`` if it can be: cleanup must never mask the error (or result) at hand."""
    try:
        os.unlink(path)
    except OSError:
        pass


def write_temp(folder: Path, data: bytes, prefix: str, suffix: str = ".tmp") -> Path:
    """Write ``data`` durably to a new temporary file in ``folder`` (created if needed).

    The name starts with a dot and ends in ``.tmp``, so it is never mistaken for a finished file;
    on any failure the temporary file is removed and the error re-raised.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(folder, prefix, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` through a temporary file in the same folder and a rename.

    Readers see the old file or the new one, never a torn one.
    """
    tmp = write_temp(path.parent, data, prefix=f".{path.name}.")
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def exclusive_publish(tmp: Path, make_name: Callable[[int], Path], start: int, attempts: int = 100000) -> Path:
    """Give the finished file ``tmp`` the first free name ``make_name(n)`` for n >= start.

    ``os.link`` fails if the name exists, so two processes can never overwrite each other's file;
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
        raise FileExistsError(f"no free file name after {attempts} tries in {tmp.parent}")
    finally:
        _remove_quietly(tmp)


def create_temp(folder: Path, prefix: str, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new file with a random name in ``folder``, open for writing: (descriptor, path); for a
    writer that fills it piece by piece (positioned writes) before renaming it into place."""
    return _create_temp(folder, prefix, suffix)


def remove_quietly(path: Path | str) -> None:
    """Remove the file ``path`` if it can be; never raises."""
    _remove_quietly(path)


def open_for_reading(path: Path | str) -> int:
    """A read-only descriptor of ``path`` for positioned reads (not inherited by child
    processes); OSError as ``os.open`` raises it."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))


def close_quietly(fd: int) -> int:
    """Close the descriptor ``fd`` when it is open (>= 0), never raising; returns -1, the closed
    value to store back (``self.fd = close_quietly(self.fd)``)."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    return -1


def pread_full(fd: int, into: memoryview, offset: int) -> None:
    """Fill ``into`` from ``fd`` at ``offset`` (positioned reads, so threads can share ``fd``);
    OSError if the file ends first."""
    done = 0
    total = len(into)
    while done < total:
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        done += n
