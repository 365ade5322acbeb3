"""The render history: one JSON object per line in ``data_dir()/history.jsonl`` (renders of the app
and of ``sdterm generate``, recorded by ``sdterm/service.py``), appended and never rewritten (a line
torn by a crash is isolated and skipped), with the app's Up/Down recall and fuzzy search. No UI
imports."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import paths
from .params import LEGACY_NAMES, Params


def history_file() -> Path:
    """Where the prompt history lives: ``data_dir()/history.jsonl`` (``SDTERM_DATA_DIR``)."""
    return paths.data_dir() / "history.jsonl"


# --------------------------------------------------------------------------------------------
# History: one JSON object per line, appended and never rewritten
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise ValueError(f"history: {name} is not a number")


@dataclass(frozen=True)
class HistoryEntry:
    """One finished render: its parameters, where its image went, the model, when.

    A line of ``history.jsonl`` is one JSON object: ``time``, then every field of
    :meth:`Params.to_dict`, then ``path`` and ``model_hash``. The variation fields are also written
    under their :data:`~sdterm.params.LEGACY_NAMES` (``variation``, ``variation_seed``), the only names
    lines written by earlier versions have for them, so an earlier sdterm still reads a newer
    history (a superset of the old line); a line written before a parameter existed reads back
    with that parameter's default.
    """

    params: Params
    path: str | None
    """The saved PNG, or None when the image was not saved."""
    model_hash: str
    time: str
    """When it finished: ISO 8601, UTC."""

    @classmethod
    def now(cls, params: Params, path: str | Path | None, model_hash: str) -> "HistoryEntry":
        """The entry for a render of ``params`` finishing now, saved at ``path`` (None: not saved)."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(params, None if path is None else str(path), model_hash, stamp)

    def to_json(self) -> str:
        """One line of JSON (newlines inside the texts are escaped by the encoder)."""
        fields = self.params.to_dict()
        legacy = {old: fields[name] for name, old in LEGACY_NAMES.items()}
        line = {"time": self.time, **fields, **legacy, "path": self.path, "model_hash": self.model_hash}
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> "HistoryEntry":
        """Parse a line written by :meth:`to_json` (now or by an earlier sdterm); ValueError for
        anything malformed.

        Unknown keys are ignored (a newer sdterm may add some); a missing ``time``, ``path`` or
        ``model_hash``, wrong types, non-finite numbers and parameters outside the renderable ranges
        are errors (:meth:`Params.from_dict` says which parameters may be missing).
        """
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
        return cls(Params.from_dict(data), path, model_hash, time)  # ConfigError is a ValueError

    def same_render(self, other: "HistoryEntry") -> bool:
        """Same prompt and parameters (time, file and model aside)."""
        return self.params == other.params


class History:
    """The prompt history: ``history.jsonl``, read once at start, appended to after each render.

    Appends are single ``O_APPEND`` writes followed by fsync, so several sdterm processes can
    share one file and a crash leaves at most one torn last line. Lines that do not parse are
    skipped (and counted in :attr:`skipped`), never repaired or rewritten.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: list[HistoryEntry] = []
        """Oldest first."""
        self.skipped = 0
        """Lines skipped at load because they did not parse (torn by a crash, or edited by hand)."""
        self._load()

    def _load(self) -> None:
        """Read the file; a missing file is an empty history. Other read errors (OSError) propagate."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        # Split on "\n" only: str.splitlines() would also split inside a prompt at U+2028 and friends.
        for chunk in raw.split(b"\n"):
            if not chunk.strip():
                continue
            try:
                self.entries.append(HistoryEntry.from_json(chunk.decode("utf-8")))
            except ValueError:  # UnicodeDecodeError and json.JSONDecodeError are ValueErrors
                self.skipped += 1

    def append(self, entry: HistoryEntry) -> None:
        """Add ``entry`` as one line at the end of the file (folders created as needed).

        If the file does not end with a newline (a crash in the middle of an earlier write), a
        newline goes first so that the torn line stays a line of its own, skipped at load, and
        this entry is not glued to it. Raises OSError for the caller to report; the entry is
        added to :attr:`entries` only once it is on disk.
        """
        line = entry.to_json().encode("utf-8") + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    line = b"\n" + line
            # One write call: with O_APPEND the kernel places it at the end as a whole, so lines
            # from two processes appending at once never interleave within a line.
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.entries.append(entry)

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
        and parameters appear once (the newest). An empty query lists :meth:`prompts`.
        """
        needle = " ".join(query.lower().split())
        if not needle:
            return self.prompts()[:limit]
        ranked: list[tuple[int, float, int, HistoryEntry]] = []
        for index, entry in enumerate(self.entries):
            rank = _match_rank(needle, entry.params.prompt.lower())
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


def _word_start(text: str, i: int) -> bool:
    return i == 0 or (text[i].isalnum() and not text[i - 1].isalnum())


def _match_rank(needle: str, text: str) -> tuple[int, float] | None:
    """(tier, score) of ``needle`` in ``text`` (both lower case), or None if it does not match.

    Tier 0: prefix; 1: substring at a word start; 2: substring; 3: subsequence. Higher scores
    rank first within a tier.
    """
    if text.startswith(needle):
        return 0, 0.0
    at = text.find(needle)
    if at >= 0:
        while at >= 0:
            if _word_start(text, at):
                return 1, 0.0
            at = text.find(needle, at + 1)
        return 2, 0.0
    letters = needle.replace(" ", "")
    it = iter(text)
    if not all(c in it for c in letters):
        return None
    return 3, _subsequence_score(letters, text)


_GAP = 0.01


def _subsequence_score(needle: str, text: str) -> float:
    """Best alignment of ``needle`` as a subsequence of ``text``: a letter on a word start scores
    3, a letter right after the previous matched one 2, any other letter 0, less 0.01 for each
    letter skipped between two matches (so a tighter match wins a tie).

    Dynamic programming over the positions where each letter occurs (not over all of ``text``),
    so a search through thousands of prompts stays fast enough for every keystroke.
    """
    where: dict[str, list[int]] = {}
    for j, ch in enumerate(text):
        where.setdefault(ch, []).append(j)
    # prev: (position, best score of needle[:i] ending with needle[i-1] at that position), by position
    prev = [(j, 3.0 if _word_start(text, j) else 0.0) for j in where.get(needle[0], ())]
    for c in needle[1:]:
        by_pos = dict(prev)
        cur: list[tuple[int, float]] = []
        best_before = float("-inf")  # max over earlier positions k <= j - 2 of score + GAP * k
        k = 0
        for j in where.get(c, ()):
            while k < len(prev) and prev[k][0] <= j - 2:
                best_before = max(best_before, prev[k][1] + _GAP * prev[k][0])
                k += 1
            options = [best_before - _GAP * (j - 1)]  # skipping the j - k - 1 letters between
            if j - 1 in by_pos:
                options.append(by_pos[j - 1] + 2.0)  # right after the previous letter
            best = max(options)
            if best > float("-inf"):
                cur.append((j, best + (3.0 if _word_start(text, j) else 0.0)))
        prev = cur
    return max((score for _, score in prev), default=0.0)


# --------------------------------------------------------------------------------------------
# Up/Down recall in the prompt box
# --------------------------------------------------------------------------------------------


class Recall:
    """Shell-like navigation through :meth:`History.prompts` with Up (older) and Down (newer).

    The first step back remembers the text being typed (the draft); stepping forward past the
    newest entry gives the draft back.
    """

    def __init__(self, history: History):
        self.history = history
        self._entries: list[HistoryEntry] = []
        self._index: int | None = None  # None: at the present (the draft)
        self._draft = ""

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
        self._index = None
        self._entries = []
        self._draft = ""


