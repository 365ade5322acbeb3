"""The state of an interactive sdterm session, without any UI: the current render parameters,
the seed and its lock, and the slash commands typed into the prompt box (the prompt history,
Up/Down recall and fuzzy search live in ``history.py``).

The Textual app (``sdterm.ui``) drives this module; nothing here imports textual or rich, so a
test, a script or another front end can use it as it is. Values are checked by the same
validator as the command line (:func:`sdterm.config.validate_request`), so a bad ``/steps 0``
gets exactly the message that ``--steps 0`` gets.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass, replace

from .config import MAX_SEED, ConfigError, RenderRequest, parse_size, validate_request
from .history import History, HistoryEntry, Recall, history_file, request_from

__all__ = [
    "CommandError", "Command", "History", "HistoryEntry", "Outcome", "Params", "Recall", "Session",
    "history_file", "parse_command",
]

MIN_BUDGET = 256 * 2**20
"""The smallest VRAM budget accepted, as for the command line's ``--vram-budget``."""

VARIATION_STEP = 0.05
"""The usual step of :meth:`Session.change_variation` (the app binds it to two keys)."""


class CommandError(ValueError):
    """A slash command or its value is not valid; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


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
        return request_from(prompt, self)


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
        entry = HistoryEntry.from_request(request, path, model_hash)
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
