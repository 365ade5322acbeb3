"""The state of an interactive sdterm session, without any UI: the current render parameters,
the seed and its lock, the prompt history on disk, Up/Down recall, fuzzy search and the slash
commands typed into the prompt box.

The Textual app (``sdterm.ui``) drives this module; nothing here imports textual or rich, so a
test, a script or another front end can use it as it is. Values are checked by the same
validator as the command line (:func:`sdterm.config.validate_request`), so a bad ``/steps 0``
gets exactly the message that ``--steps 0`` gets.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from . import paths
from .config import MAX_SEED, ConfigError, RenderRequest, parse_size, validate_request

MIN_BUDGET = 256 * 2**20
"""The smallest VRAM budget accepted, as for the command line's ``--vram-budget``."""

VARIATION_STEP = 0.05
"""The usual step of :meth:`Session.change_variation` (the app binds it to two keys)."""


def history_file() -> Path:
    """Where the prompt history lives: ``data_dir()/history.jsonl`` (``SDTERM_DATA_DIR``)."""
    return paths.data_dir() / "history.jsonl"


class CommandError(ValueError):
    """A slash command or its value is not valid; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _request(prompt: str, p: "Params | HistoryEntry") -> RenderRequest:
    """A render request from anything carrying sdterm's render parameters (variation = subseed)."""
    return RenderRequest(
        prompt=prompt,
        negative=p.negative,
        seed=p.seed,
        steps=p.steps,
        cfg=p.cfg,
        width=p.width,
        height=p.height,
        eta=p.eta,
        subseed=p.variation_seed,
        subseed_strength=p.variation,
    )


@dataclass
class Params:
    """The render parameters the next render uses; the app's parameter bar shows them."""

    negative: str = ""
    """Negative prompt (the unconditional text of classifier-free guidance)."""
    seed: int = 0
    """Seed of the starting noise, 0 ... 2^32-1."""
    seed_locked: bool = False
    """True keeps the seed for new prompts; False draws a new random seed for each new prompt."""
    steps: int = 50
    """DDIM steps."""
    cfg: float = 7.5
    """Classifier-free guidance scale."""
    width: int = 512
    """Image width in pixels (a multiple of 8)."""
    height: int = 512
    """Image height in pixels (a multiple of 8)."""
    eta: float = 0.0
    """DDIM eta (0 deterministic, 1 ancestral)."""
    variation: float = 0.0
    """AUTOMATIC1111 variation strength 0..1 (``RenderRequest.subseed_strength``); 0 is off."""
    variation_seed: int = 0
    """The seed whose noise the variation mixes in (``RenderRequest.subseed``)."""
    budget: int | None = None
    """VRAM budget in bytes; None lets the engine decide from the free memory."""

    def request(self, prompt: str) -> RenderRequest:
        """The render request for ``prompt`` with these parameters (not validated)."""
        return _request(prompt, self)


# --------------------------------------------------------------------------------------------
# History: one JSON object per line, appended and never rewritten
# --------------------------------------------------------------------------------------------

_FLOAT_FIELDS = ("cfg", "eta", "variation")
_PARAM_FIELDS = ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "eta", "variation", "variation_seed")


def _reject_constant(name: str) -> float:
    raise ValueError(f"history: {name} is not a number")


@dataclass(frozen=True)
class HistoryEntry:
    """One finished render, as a line of ``history.jsonl``."""

    time: str
    """When it finished: ISO 8601, UTC."""
    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    eta: float
    variation: float
    variation_seed: int
    path: str | None
    """The saved PNG, or None when the image was not saved."""
    model_hash: str

    def to_json(self) -> str:
        """One line of JSON (newlines inside the texts are escaped by the encoder)."""
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> "HistoryEntry":
        """Parse a line written by :meth:`to_json`; ValueError for anything malformed.

        Unknown keys are ignored (a newer sdterm may add some); missing keys, wrong types,
        non-finite numbers and parameters outside the renderable ranges are errors.
        """
        try:
            data = json.loads(line, parse_constant=_reject_constant)
        except RecursionError:
            raise ValueError("history: nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("history: a line must be a JSON object")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                raise ValueError(f"history: missing {f.name}")
            value = data[f.name]
            if f.name in _FLOAT_FIELDS:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            elif f.name in ("seed", "steps", "width", "height", "variation_seed"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif f.name == "path":
                ok = value is None or isinstance(value, str)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise ValueError(f"history: {f.name} has the wrong type ({type(value).__name__})")
            values[f.name] = value
        entry = cls(**values)
        try:
            stamp = datetime.fromisoformat(entry.time)
        except ValueError:
            raise ValueError(f"history: time is not ISO 8601: {entry.time[:40]!r}") from None
        if stamp.tzinfo is None:
            raise ValueError("history: time has no time zone")
        validate_request(entry.request())  # ConfigError is a ValueError
        return entry

    def request(self) -> RenderRequest:
        """The render request this entry records (not validated)."""
        return _request(self.prompt, self)

    def same_render(self, other: "HistoryEntry") -> bool:
        """Same prompt and parameters (time, file and model aside)."""
        return all(getattr(self, name) == getattr(other, name) for name in _PARAM_FIELDS)


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
            rank = _match_rank(needle, entry.prompt.lower())
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


# --------------------------------------------------------------------------------------------
# Slash commands
# --------------------------------------------------------------------------------------------

_NO_ARG, _ONE_VALUE, _TEXT = "none", "value", "text"

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (argument kind, usage, what it does)
    "seed": (_ONE_VALUE, "/seed N", "set the seed (0 ... 4294967295) and lock it"),
    "steps": (_ONE_VALUE, "/steps N", "DDIM steps (1 ... 1000)"),
    "cfg": (_ONE_VALUE, "/cfg F", "guidance scale (0 ... 50; 1 = no guidance)"),
    "size": (_TEXT, "/size WxH", "image size, multiples of 8, e.g. /size 512x768"),
    "neg": (_TEXT, "/neg TEXT", "negative prompt (/neg alone clears it)"),
    "eta": (_ONE_VALUE, "/eta F", "DDIM eta (0 ... 1)"),
    "budget": (_ONE_VALUE, "/budget SIZE|auto", "VRAM budget, e.g. /budget 2G (at least 256M)"),
    "open": (_NO_ARG, "/open", "open the last image"),
    "load": (_TEXT, "/load IMAGE.png", "take the prompt and settings stored in a PNG (sdterm or AUTOMATIC1111)"),
    "cache": (_NO_ARG, "/cache", "show the prompt-embedding cache"),
    "help": (_NO_ARG, "/help", "show the commands and keys"),
    "quit": (_NO_ARG, "/quit", "leave sdterm"),
}
"""Every slash command: its argument kind, its usage and a short description (for /help)."""

_ALIASES = {"exit": "quit", "q": "quit", "negative": "neg", "?": "help"}

_COMMAND_LIST = " ".join(f"/{name}" for name in COMMANDS)


@dataclass(frozen=True)
class Command:
    name: str
    """Canonical name, without the slash: one of :data:`COMMANDS`."""
    arg: str
    """The argument, stripped ("" when none)."""


def _shown(text: str, limit: int = 30) -> str:
    """``text`` made safe for a one-line message: single line, shortened."""
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def parse_command(text: str) -> Command | None:
    """``"/steps 30"`` -> Command("steps", "30"); None when ``text`` is not a command (does not
    start with "/"). CommandError (one line) for an unknown command or a missing or extra
    argument; the argument's value is checked by :meth:`Session.apply`."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    parts = stripped[1:].split(None, 1)
    name = parts[0].lower() if parts else ""
    arg = parts[1].strip() if len(parts) > 1 else ""
    if not name:
        raise CommandError(f"type a command after the slash: {_COMMAND_LIST}")
    name = _ALIASES.get(name, name)
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean /{close[0]}?)" if close else ""
        raise CommandError(f"unknown command /{_shown(name, 20)}{hint}; commands: {_COMMAND_LIST}")
    kind, usage, _ = COMMANDS[name]
    if kind == _NO_ARG and arg:
        raise CommandError(f"/{name} takes no argument, got {_shown(arg)!r}")
    if kind == _ONE_VALUE:
        if not arg:
            raise CommandError(f"/{name} needs a value: {usage}")
        if len(arg.split()) > 1:
            raise CommandError(f"/{name} takes one value, got {_shown(arg)!r}: {usage}")
    if name == "size" and not arg:
        raise CommandError(f"/size needs a value: {usage}")
    return Command(name, arg)


def help_line() -> str:
    """One line listing the commands, for the notice line."""
    return " · ".join(usage for _, usage, _ in COMMANDS.values())


@dataclass(frozen=True)
class Outcome:
    """What the app should do after :meth:`Session.apply`."""

    action: str
    """"render" | "message" | "open" | "cache" | "help" | "quit" | "budget" | "none"."""
    message: str = ""
    """What to show on the notice line (for "open": the file to open)."""


def _fmt_bytes(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.2f}".rstrip("0").rstrip(".") + unit
    return f"{n}B"


_SIZE_RE = re.compile(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------


class Session:
    """Parameters, seed, history and commands of one interactive session.

    Methods that lead to a render return the validated :class:`RenderRequest` for the app to
    hand to the engine; parameters change only when the request is valid.
    """

    def __init__(self, params: Params, history: History, rng: random.Random | None = None):
        self.params = params
        self.history = history
        self.rng = rng if rng is not None else random.Random()
        self.last_prompt: str | None = None
        """The prompt of the last render asked for; what the seed and variation keys re-render."""
        self.last_path: str | None = None
        """The last image saved, for /open."""

    # ---- renders ---------------------------------------------------------------------------

    def _random_seed(self, avoid: int | None = None) -> int:
        while True:
            seed = self.rng.randint(0, MAX_SEED)
            if seed != avoid:
                return seed

    def _commit(self, trial: Params, prompt: str) -> RenderRequest:
        """Validate ``trial`` for ``prompt``; on success it becomes the parameters."""
        req = trial.request(prompt)
        validate_request(req)
        self.params = trial
        return req

    def request(self, prompt: str) -> RenderRequest:
        """The request for ``prompt`` with the current parameters; ConfigError on bad values."""
        req = self.params.request(prompt)
        validate_request(req)
        return req

    def new_prompt(self, prompt: str) -> RenderRequest:
        """Render a newly entered prompt: a new random seed first unless the seed is locked."""
        trial = self.params if self.params.seed_locked else replace(self.params, seed=self._random_seed())
        req = self._commit(trial, prompt)
        self.last_prompt = prompt
        return req

    def nudge_seed(self, delta: int) -> RenderRequest | None:
        """Seed + ``delta`` (modulo 2^32) and re-render the last prompt; None (and nothing
        changed) when nothing was rendered yet."""
        if self.last_prompt is None:
            return None
        return self._commit(replace(self.params, seed=(self.params.seed + delta) % (MAX_SEED + 1)), self.last_prompt)

    def reroll(self) -> RenderRequest | None:
        """A new random seed and re-render the last prompt; None when nothing was rendered yet."""
        if self.last_prompt is None:
            return None
        return self._commit(replace(self.params, seed=self._random_seed(self.params.seed)), self.last_prompt)

    def toggle_lock(self) -> bool:
        self.params.seed_locked = not self.params.seed_locked
        return self.params.seed_locked

    def change_variation(self, delta: float) -> RenderRequest | None:
        """Variation strength + ``delta``, clamped to 0..1 and rounded to 2 decimals, and
        re-render the last prompt. Going up from 0 picks a new random variation seed.

        None (and nothing changed) when nothing was rendered yet, or when the strength is
        already at the limit in that direction (there would be nothing new to see).
        """
        if self.last_prompt is None:
            return None
        old = self.params.variation
        new = min(1.0, max(0.0, round(old + delta, 2)))
        if new == old:
            return None
        trial = replace(self.params, variation=new)
        if old == 0.0 and new > 0.0:
            trial.variation_seed = self._random_seed(avoid=self.params.seed)
        return self._commit(trial, self.last_prompt)

    # ---- commands --------------------------------------------------------------------------

    def _set(self, **changes) -> Params:
        """The parameters with ``changes``, checked by config's validator; CommandError (with its
        one line) when a value is bad. Nothing is changed here."""
        trial = replace(self.params, **changes)
        try:
            validate_request(trial.request(self.last_prompt or ""))
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        return trial

    @staticmethod
    def _number(text: str, kind: type) -> object:
        """``text`` as an int or float; unparsable text is passed on as it is, so the validator
        names the parameter in its message ("steps must be a whole number, got 'abc'")."""
        try:
            return kind(text)
        except ValueError:
            return text

    def apply(self, command: Command) -> Outcome:
        """Carry out a slash command. Setting a value does not render by itself; it returns
        Outcome("message", ...) saying the new value. CommandError leaves everything unchanged."""
        name, arg = command.name, command.arg
        p = self.params
        if name == "seed":
            trial = self._set(seed=self._number(arg, int), seed_locked=True)
            self.params = trial
            return Outcome("message", f"seed {trial.seed} (locked)")
        if name == "steps":
            self.params = self._set(steps=self._number(arg, int))
            return Outcome("message", f"steps {self.params.steps}")
        if name == "cfg":
            self.params = self._set(cfg=self._number(arg, float))
            return Outcome("message", f"CFG {self.params.cfg:g}")
        if name == "eta":
            self.params = self._set(eta=self._number(arg, float))
            return Outcome("message", f"eta {self.params.eta:g}")
        if name == "size":
            m = _SIZE_RE.fullmatch(arg)
            if not m:
                raise CommandError(f"size must be WIDTHxHEIGHT such as 512x768, got {_shown(arg)!r}")
            self.params = self._set(width=int(m.group(1)), height=int(m.group(2)))
            return Outcome("message", f"size {self.params.width}×{self.params.height}")
        if name == "neg":
            self.params = self._set(negative=arg)
            return Outcome("message", f"negative prompt: {_shown(arg, 60)}" if arg else "negative prompt cleared")
        if name == "budget":
            if arg.lower() in ("auto", "none"):
                p.budget = None
                return Outcome("budget", "VRAM budget automatic")
            try:
                budget = parse_size(arg, "budget")
            except ConfigError as exc:
                raise CommandError(str(exc)) from None
            if budget < MIN_BUDGET:
                raise CommandError(f"budget must be at least 256M, got {_shown(arg)}")
            p.budget = budget
            return Outcome("budget", f"VRAM budget {_fmt_bytes(budget)}")
        if name == "open":
            if self.last_path is None:
                return Outcome("message", "nothing saved yet: render a prompt first")
            return Outcome("open", self.last_path)
        if name == "load":
            if not arg:
                raise CommandError("/load needs a file: /load IMAGE.png")
            return Outcome("load", arg)
        if name == "cache":
            return Outcome("cache")
        if name == "help":
            return Outcome("help", help_line())
        if name == "quit":
            return Outcome("quit")
        raise CommandError(f"unknown command /{_shown(name, 20)}; commands: {_COMMAND_LIST}")

    # ---- history ---------------------------------------------------------------------------

    def restore(self, entry: HistoryEntry) -> None:
        """Take the parameters of a history entry (the budget and the seed lock stay as they are).
        ConfigError, with nothing changed, if the entry holds values that cannot be rendered."""
        trial = replace(
            self.params,
            seed=entry.seed,
            steps=entry.steps,
            cfg=entry.cfg,
            width=entry.width,
            height=entry.height,
            negative=entry.negative,
            eta=entry.eta,
            variation=entry.variation,
            variation_seed=entry.variation_seed,
        )
        validate_request(trial.request(entry.prompt))
        self.params = trial

    def record(self, request: RenderRequest, path: str | None, model_hash: str) -> HistoryEntry:
        """Remember a finished render: ``last_path`` (when the image was saved) and a history line.

        The history write may raise OSError for the caller to report; ``last_path`` is set first,
        so /open still works when the history cannot be written.
        """
        if path is not None:
            self.last_path = str(path)
        entry = HistoryEntry(
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            prompt=request.prompt,
            negative=request.negative,
            seed=request.seed,
            steps=request.steps,
            cfg=float(request.cfg),
            width=request.width,
            height=request.height,
            eta=float(request.eta),
            variation=float(request.subseed_strength),
            variation_seed=request.subseed,
            path=None if path is None else str(path),
            model_hash=model_hash,
        )
        self.history.append(entry)
        return entry

    def describe(self) -> str:
        """One line for the parameter bar, e.g.
        ``seed 1234 (locked) · 50 steps · CFG 7.5 · 512×512 · eta 0 · var 0.10@567 · budget auto``.
        The variation part appears only while the variation strength is above 0."""
        p = self.params
        parts = [
            f"seed {p.seed}" + (" (locked)" if p.seed_locked else ""),
            f"{p.steps} step" + ("" if p.steps == 1 else "s"),
            f"CFG {p.cfg:g}",
            f"{p.width}×{p.height}",
            f"eta {p.eta:g}",
        ]
        if p.variation > 0:
            parts.append(f"var {p.variation:.2f}@{p.variation_seed}")
        parts.append("budget " + ("auto" if p.budget is None else _fmt_bytes(p.budget)))
        return " · ".join(parts)


__all__ = [
    "COMMANDS",
    "Command",
    "CommandError",
    "History",
    "HistoryEntry",
    "Outcome",
    "Params",
    "Recall",
    "Session",
    "help_line",
    "history_file",
    "parse_command",
]
