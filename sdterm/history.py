"""The render history: one JSON object per line in ``data_dir()/history.jsonl`` (renders of the app
and of ``sdterm generate``, recorded by ``sdterm/service.py``), numbered 1, 2, ... in file order, with
the app's Up/Down recall and fuzzy search. No UI imports.

Writers lock the sibling ``history.jsonl.lock`` (the app and a ``generate`` may append at once). A
line torn by a crash is repaired at the next load, under the lock: the file is rewritten atomically
without it and the line appended to ``history.jsonl.bad``: reported once, nothing lost."""

from __future__ import annotations

import json
import os
import re
import stat
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from . import paths
from .fsutil import write_temp
from .fuzzy import match_rank
from .params import LEGACY_NAMES, Params

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; appends are still single O_APPEND writes
    fcntl = None  # type: ignore[assignment]

def history_file() -> Path:
    """Where the prompt history lives: ``data_dir()/history.jsonl`` (``SDTERM_DATA_DIR``)."""
    return paths.data_dir() / "history.jsonl"


# ---- History: one JSON object per line, appended under a lock, repaired at load ----------------


def _reject_constant(name: str) -> float:
    raise ValueError(f"history: {name} is not a number")


@dataclass(frozen=True)
class HistoryEntry:
    """One finished render: its parameters, where its image went, the model, when.

    A line of ``history.jsonl`` is one JSON object: ``time``, every field of :meth:`Params.to_dict`,
    ``path`` and ``model_hash``. The variation fields are also written under their
    :data:`~sdterm.params.LEGACY_NAMES`, the only names earlier versions know, so an earlier sdterm
    still reads a newer history; a line written before a parameter existed reads back with its default.
    """

    params: Params
    path: str | None
    """The saved PNG, or None when the image was not saved."""
    model_hash: str
    time: str
    """When it finished: ISO 8601, UTC."""
    fork: dict | None = None
    """A render forked from another (``/fork K``): ``{"parent": its image's path or None,
    "step": K}``; None otherwise (the key is left out of the line)."""

    @classmethod
    def now(cls, params: Params, path: str | Path | None, model_hash: str,
            fork: dict | None = None) -> "HistoryEntry":
        """The entry for a render of ``params`` finishing now, saved at ``path`` (None: not saved)."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(params, None if path is None else str(path), model_hash, stamp, fork)

    def to_json(self) -> str:
        """One line of JSON (newlines inside the texts are escaped by the encoder)."""
        fields = self.params.to_dict()
        legacy = {old: fields[name] for name, old in LEGACY_NAMES.items()}
        line = {"time": self.time, **fields, **legacy, "path": self.path, "model_hash": self.model_hash}
        if self.fork is not None:
            line["fork"] = self.fork
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> "HistoryEntry":
        """Parse a line written by :meth:`to_json` (now or by an earlier sdterm); ValueError for
        anything malformed. Unknown keys are ignored (a newer sdterm may add some); a missing
        ``time``, ``path`` or ``model_hash``, wrong types, non-finite numbers and parameters outside
        the renderable ranges are errors (:meth:`Params.from_dict` says which may be missing)."""
        try:
            data = json.loads(line, parse_constant=_reject_constant)
        except RecursionError:
            raise ValueError("history: nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("history: a line must be a JSON object")
        for name in ("time", "path", "model_hash"):
            if name not in data:
                raise ValueError(f"history: missing {name}")
        time, path, model_hash = data["time"], data["path"], data["model_hash"]
        if not isinstance(time, str) or not isinstance(model_hash, str) or not (path is None or isinstance(path, str)):
            raise ValueError("history: time, path or model_hash has the wrong type")
        try:
            stamp = datetime.fromisoformat(time)
        except ValueError:
            raise ValueError(f"history: time is not ISO 8601: {time[:40]!r}") from None
        if stamp.tzinfo is None:
            raise ValueError("history: time has no time zone")
        fork = data.get("fork")
        if fork is not None and not (isinstance(fork, dict) and isinstance(fork.get("step"), int)
                                     and not isinstance(fork.get("step"), bool)
                                     and (fork.get("parent") is None or isinstance(fork.get("parent"), str))):
            raise ValueError("history: fork must be {parent: path or null, step: a whole number}")
        return cls(Params.from_dict(data), path, model_hash, time,  # ConfigError is a ValueError
                   {"parent": fork.get("parent"), "step": fork["step"]} if fork is not None else None)

    def same_render(self, other: "HistoryEntry") -> bool:
        """Same prompt and parameters (time, file and model aside)."""
        return self.params == other.params


class History:
    """The prompt history: ``history.jsonl``, read at start, appended to after each render.

    Appends are single ``O_APPEND`` writes with fsync, under the lock. Lines that are not a JSON
    object (torn by a crash, garbage) are moved to :attr:`quarantine` at load; JSON objects this
    version cannot read (edited by hand, written by a newer sdterm) stay, skipped, as does
    everything in a read-only file or folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: list[HistoryEntry] = []
        """Oldest first; entry ``n`` (numbered from 1) is ``entries[n - 1]``."""
        self.skipped = 0
        """Lines skipped because they did not parse (and were not moved to :attr:`quarantine`)."""
        self.repaired = 0
        """Unreadable lines moved out of the file at load, into :attr:`quarantine`."""
        self.quarantine: Path | None = None
        """Where :attr:`repaired` lines went (``history.jsonl.bad``, appended to); None if none moved."""
        self._size = 0  # bytes of the file that entries reflect
        self._load()

    def _parse(self, raw: bytes) -> tuple[list[bytes], list[bytes]]:
        """Read ``raw`` into entries; (lines to keep, lines that are not a JSON object)."""
        self.entries, self.skipped, self._size = [], 0, len(raw)
        keep, junk = [], []  # type: list[bytes], list[bytes]
        # Split on "\n" only: str.splitlines() would also split inside a prompt at U+2028 and friends.
        for chunk in raw.split(b"\n"):
            if not chunk.strip():
                continue
            try:
                self.entries.append(HistoryEntry.from_json(chunk.decode("utf-8")))
            except ValueError:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                self.skipped += 1
                if not _json_object(chunk):
                    junk.append(chunk)
                    continue
            keep.append(chunk)
        return keep, junk

    def _load(self) -> None:
        """Read the file (missing: an empty history; other OSErrors propagate) and repair it."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        if self._parse(raw)[1]:
            with suppress(OSError):  # read-only, disk full: the file stays as it is, those lines skipped
                self._repair()

    def _repair(self) -> None:
        """Move the lines that are not JSON objects to ``history.jsonl.bad``. Under the lock, so a
        line that only looked torn because another process was writing it is seen whole."""
        with _locked(self.path) as held:
            if not held:
                return
            keep, junk = self._parse(self.path.read_bytes())
            if not junk:
                return
            target = Path(os.path.realpath(self.path))  # a symlinked history stays a symlink
            bad = self.path.with_name(self.path.name + ".bad")
            data = b"".join(chunk + b"\n" for chunk in keep)
            tmp = write_temp(target.parent, data, prefix=f".{target.name}.")
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
                _append_bytes(bad, b"".join(chunk + b"\n" for chunk in junk))
                os.replace(tmp, target)
            except BaseException:
                with suppress(OSError):
                    os.unlink(tmp)
                raise
            self._size = len(data)
            self.skipped -= len(junk)
            self.repaired, self.quarantine = len(junk), bad

    def refresh(self) -> None:
        """Take in what other processes appended since (a stat when nothing changed); the entries
        stay as they are when the file cannot be read."""
        try:
            if os.stat(self.path).st_size != self._size:
                self._parse(self.path.read_bytes())
        except FileNotFoundError:
            self._parse(b"")
        except OSError:
            pass

    def append(self, entry: HistoryEntry) -> None:
        """Add ``entry`` as one line at the end of the file (folders created as needed), after taking
        in what other processes appended (:attr:`entries` stays in file order). OSError for the
        caller to report; the entry is added to :attr:`entries` only once it is on disk."""
        line = entry.to_json().encode("utf-8") + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            self.refresh()
            self._size = _append_bytes(self.path, line)
        self.entries.append(entry)

    def numbered(self, last: int | None = None) -> list[tuple[int, HistoryEntry]]:
        """(number, entry), oldest first, numbered 1, 2, ... in file order (stable while the file
        only grows); only the ``last`` newest when given."""
        self.refresh()
        pairs = list(enumerate(self.entries, 1))
        return pairs if last is None else pairs[max(0, len(pairs) - last):]

    def get(self, number: int) -> HistoryEntry | None:
        """Entry ``number`` (1 is the oldest), or None."""
        self.refresh()
        return self.entries[number - 1] if 1 <= number <= len(self.entries) else None

    def by_image(self, ref: str) -> HistoryEntry | None:
        """The newest entry whose image is ``ref``: a path, a file name (``00042-1234.png``, the
        ``.png`` may be left out) or the image's number (``42``, as in ``NNNNN-SEED.png``)."""
        self.refresh()
        ref = ref.strip()
        full = _absolute(ref) if "/" in ref or os.sep in ref else None
        return next((e for e in reversed(self.entries) if e.path and _shows(e.path, ref, full)), None)

    def prompts(self) -> list[HistoryEntry]:
        """Newest first, without consecutive repeats of the same prompt and parameters."""
        out: list[HistoryEntry] = []
        for entry in reversed(self.entries):
            if out and out[-1].same_render(entry):
                continue
            out.append(entry)
        return out

    def search(self, query: str, limit: int = 50) -> list[HistoryEntry]:
        """Entries whose prompt contains the letters of ``query`` in order (case-insensitive).
        Ranked: the prompt starts with the query, then the query appears whole at a word start,
        then anywhere, then as a scattered subsequence (scored by letters on word starts and
        letters that follow each other); ties go to the newer entry. Repeats of the same prompt
        and parameters appear once (the newest). An empty query lists :meth:`prompts`."""
        needle = " ".join(query.lower().split())
        if not needle:
            return self.prompts()[:limit]
        ranked: list[tuple[int, float, int, HistoryEntry]] = []
        for index, entry in enumerate(self.entries):
            rank = match_rank(needle, entry.params.prompt.lower())
            if rank is not None:
                ranked.append((rank[0], -rank[1], -index, entry))
        ranked.sort(key=lambda r: r[:3])
        out: list[HistoryEntry] = []
        for *_, entry in ranked:
            if any(seen.same_render(entry) for seen in out):
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out


_IMAGE_NUMBER = re.compile(r"([0-9]+)-")


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _shows(path: str, ref: str, full: str | None) -> bool:
    """Whether the image at ``path`` is the one ``ref`` names (``full``: ref as an absolute path)."""
    if full is not None:
        return _absolute(path) == full
    name = os.path.basename(path)
    number = _IMAGE_NUMBER.match(name)
    return name in (ref, ref + ".png") or (ref.isascii() and ref.isdigit() and number is not None and int(number[1]) == int(ref))


def _json_object(chunk: bytes) -> bool:
    """True if the line is a JSON object (then it is kept even if this version cannot read it)."""
    try:
        return isinstance(json.loads(chunk.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


@contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold the exclusive lock on ``path``'s sibling ``.lock`` file (never replaced, unlike the history);
    yields False when it cannot be had (a read-only folder, no ``fcntl``): the caller goes on unlocked."""
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        yield False
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fcntl is not None
    finally:
        os.close(fd)  # releases the lock


def _append_bytes(path: Path, data: bytes) -> int:
    """Append ``data`` in one write and fsync; the new size. A newline goes first if the file does not
    end with one (a crash mid-write), so the torn line stays a line of its own, not glued to ``data``."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


# ---- Up/Down recall in the prompt box -------------------------------------------------------------


class Recall:
    """Shell-like navigation through :meth:`History.prompts` with Up (older) and Down (newer).

    The first step back remembers the text being typed (the draft); stepping forward past the
    newest entry gives the draft back.
    """

    def __init__(self, history: History):
        self.history = history
        self.reset()

    @property
    def active(self) -> bool:
        """True while an entry from the history is shown instead of the draft."""
        return self._index is not None

    def older(self, current_text: str) -> HistoryEntry | None:
        """The next older entry; None when there is none (the history is empty or at its oldest)."""
        if self._index is None:
            self._entries = self.history.prompts()
            if not self._entries:
                return None
            self._draft = current_text
            self._index = 0
            return self._entries[0]
        if self._index + 1 >= len(self._entries):
            return None
        self._index += 1
        return self._entries[self._index]

    def newer(self) -> HistoryEntry | str | None:
        """The next newer entry; past the newest, the remembered draft (a str); None when
        already at the present."""
        if self._index is None:
            return None
        if self._index == 0:
            draft = self._draft
            self.reset()
            return draft
        self._index -= 1
        return self._entries[self._index]

    def reset(self) -> None:
        """Back to the present (after a render, or when the user types)."""
        self._entries: list[HistoryEntry] = []
        self._index: int | None = None  # None: at the present (the draft)
        self._draft = ""


