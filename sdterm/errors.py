"""How a failure reaches the user: one line for what the user can do something about, and an honest
"internal error" for everything else (a bug), with the traceback one flag away.

Known failures are sdterm's own error types (a bad setting, a refused checkpoint, a prompt that
can't be encoded, a budget too small, a failed download, unreadable PNG metadata...), running out
of memory, file errors (``OSError``: the path and the reason) and Ctrl+C. Anything else is a bug:
it is never dressed up as a user error, it gets its own exit code, and ``--debug`` (or
``SDTERM_DEBUG=1``) prints its traceback.

A leaf: it imports nothing from sdterm at the top, so anything may import it (the engine raises
:class:`ConfigError`; the command line and the app report failures with :func:`classify` and
:func:`report`). The engine never prints.

Exit codes of ``sdterm``:

* 0: success
* 1 (``EXIT_ERROR``): a problem the user can fix, reported in one line
* 2 (``EXIT_USAGE``): a bad command line (argparse's usage message)
* 70 (``EXIT_INTERNAL``, ``EX_SOFTWARE`` in sysexits.h): an internal error, i.e. a bug in sdterm
* 130 (``EXIT_CANCELLED``): cancelled with Ctrl+C
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_CANCELLED = 130

DEBUG_ENV = "SDTERM_DEBUG"
OOM_HINT = "try a smaller size or a lower VRAM budget, or close other GPU programs"
ERROR_LOG_MAX = 1 << 20
"""The app's error log is cut back to its newest half when it grows past this many bytes."""


class UserError(Exception):
    """A problem to report as one line."""


class ConfigError(ValueError):
    """A settings file or a parameter is invalid; the message is one line meant for the user."""


# (module, class name) of the project's error types whose message is already the one line to show.
# They are looked up among the modules already imported: an exception of a class can only exist
# once its module is loaded, and classifying a failure must not import torch.
USER_ERRORS = (
    ("sdterm.session", "CommandError"),
    ("sdterm.pngmeta", "MetadataError"),
    ("sdterm.download", "DownloadError"),
    ("sdterm.engine.loading.checkpoint", "CheckpointError"),
    ("sdterm.engine.prompt.tokenizer", "PromptError"),
    ("sdterm.engine.init_image", "InitImageError"),
    ("sdterm.engine.memory.planner", "BudgetTooSmall"),
    ("sdterm.engine.pipeline", "OutOfMemory"),
)


@dataclass(frozen=True)
class Failure:
    """What to tell the user about one exception."""

    kind: str
    """"error" (the user can act on it), "cancelled", or "internal" (a bug)."""
    line: str
    """One line, without the ``sdterm: ...:`` prefix."""

    @property
    def internal(self) -> bool:
        return self.kind == "internal"

    @property
    def exit_code(self) -> int:
        return {"error": EXIT_ERROR, "cancelled": EXIT_CANCELLED, "internal": EXIT_INTERNAL}[self.kind]


def debug_enabled(flag: bool = False) -> bool:
    """``--debug`` was given, or ``SDTERM_DEBUG`` is set to something other than 0/false/no/off."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(flag) or value not in ("", "0", "false", "no", "off")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of the exception's message (its type's name when there is none),
    cut to ``limit`` characters when given."""
    line = next((t.strip() for t in str(exc).splitlines() if t.strip()), "")
    line = line or type(exc).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def shorten(text: str, limit: int = 30) -> str:
    """``text`` (say, what the user typed) fit for a one-line message: blanks and line breaks
    collapsed to single spaces, cut to ``limit`` characters."""
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def _oom_summary(exc: BaseException) -> str:
    """torch's out-of-memory line without its advice on allocator settings: the first three
    sentences (what was asked for, what the card has, what is free)."""
    sentences = re.split(r"(?<=\.)\s+", first_line(exc))
    return first_line(Exception(" ".join(sentences[:3]).rstrip(".")), 300)


def _loaded_class(module: str, name: str) -> type | None:
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


def is_user_error(exc: BaseException) -> bool:
    types = [UserError, ConfigError] + [c for c in (_loaded_class(m, n) for m, n in USER_ERRORS) if c is not None]
    return isinstance(exc, tuple(types))


def is_cancelled(exc: BaseException) -> bool:
    cancelled = _loaded_class("sdterm.engine.pipeline", "Cancelled")
    return isinstance(exc, KeyboardInterrupt) or (cancelled is not None and isinstance(exc, cancelled))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error, or a RuntimeError that says "out of memory" (cuDNN, cuBLAS,
    other backends)."""
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom, type) and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def os_error_line(exc: OSError) -> str:
    """'PATH: reason' (both paths for a rename or link), or the reason alone when no file is named."""
    reason = exc.strerror or first_line(exc)
    if exc.filename is None:
        return reason
    names = os.fsdecode(exc.filename) if isinstance(exc.filename, (str, bytes)) else str(exc.filename)
    if exc.filename2 is not None:
        names += " -> " + (os.fsdecode(exc.filename2) if isinstance(exc.filename2, (str, bytes)) else str(exc.filename2))
    return f"{names}: {reason}"


def classify(exc: BaseException) -> Failure:
    """What kind of failure ``exc`` is, and its one line."""
    if is_cancelled(exc):
        return Failure("cancelled", "cancelled; nothing was written")
    if is_user_error(exc):
        return Failure("error", first_line(exc))
    if is_out_of_memory(exc):
        return Failure("error", f"out of GPU memory: {_oom_summary(exc)} ({OOM_HINT})")
    if isinstance(exc, MemoryError):
        return Failure("error", "out of memory (RAM): try a smaller size, or close other programs")
    if isinstance(exc, OSError):
        return Failure("error", os_error_line(exc))
    return Failure("internal", f"{type(exc).__name__}: {first_line(exc, 300)}")


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def report(exc: BaseException, *, debug: bool, stream: TextIO | None = None) -> int:
    """Tell the user about ``exc`` on ``stream`` (stderr) and return the exit code.

    One line always comes last; with ``debug`` the traceback comes first. Without it a bug's line
    says how to get the traceback.
    """
    stream = stream if stream is not None else sys.stderr
    failure = classify(exc)
    if debug:
        stream.write(traceback_text(exc))
    if failure.kind == "cancelled":
        stream.write(f"sdterm: {failure.line}\n")
    elif failure.internal:
        how = "the traceback is above" if debug else f"run with --debug (or {DEBUG_ENV}=1) for the traceback"
        stream.write(f"sdterm: internal error: {failure.line} (a bug: {how})\n")
    else:
        stream.write(f"sdterm: error: {failure.line}\n")
    stream.flush()
    return failure.exit_code


def error_log_file() -> Path:
    """Where the app keeps the tracebacks of internal errors (the cache folder's ``error.log``)."""
    from . import paths

    return paths.cache_dir() / "error.log"


_LOG_HEAD = b"---- "


def log_traceback(exc: BaseException, where: str = "") -> Path | None:
    """Append ``exc``'s traceback, with the time, to :func:`error_log_file`; its path, or None when
    it could not be written. Never raises."""
    try:
        from . import __version__
    except ImportError:
        __version__ = "?"
    try:
        path = error_log_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if path.stat().st_size > ERROR_LOG_MAX:  # keep the newest entries, whole, in half of it
                tail = path.read_bytes()[-ERROR_LOG_MAX // 2 :]
                start = tail.find(b"\n" + _LOG_HEAD)
                path.write_bytes(tail[start + 1 :] if start >= 0 else b"")
        except FileNotFoundError:
            pass
        stamp = time.strftime("%Y-%m-%d %H:%M:%S%z")
        head = f"{_LOG_HEAD.decode()}{stamp} sdterm {__version__} pid {os.getpid()}{' ' + where if where else ''}\n"
        with open(path, "a", encoding="utf-8", errors="replace") as f:
            f.write(head + traceback_text(exc) + "\n")
        return path
    except Exception:
        return None
