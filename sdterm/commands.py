"""The slash commands typed into the app's prompt box, one registry entry each.

An entry (:class:`SlashCommand`) holds everything about a command: its name and aliases, the kind
of argument it takes, its usage and help text, and its handler. The parser
(:func:`parse_command`), :meth:`sdterm.session.Session.apply`, the ``/help`` line, the help screen
and the prompt box's completion all read :data:`COMMANDS`, so adding a command is one entry here.

A handler gets the session and the argument and returns an :class:`Outcome`: what the front end
should do next ("message", "budget", "open", "load", "cache", "help", "quit"). It changes the
session only through its public API (``params``, ``set``, ``seed_locked``, ``budget``,
``last_path``) and raises :class:`CommandError` (one line) with nothing changed for a bad value.
No UI imports; nothing here imports the session.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError, shorten
from .params import MAX_SEED
from .units import MIN_BUDGET, format_bytes, parse_budget, parse_wh


class CommandError(ValueError):
    """A slash command or its value is not valid; the message is one line meant for the user."""


NO_ARG, ONE_VALUE, TEXT, REQUIRED_TEXT = "none", "value", "text", "required text"
"""Argument kinds: nothing; exactly one word; any text, maybe empty; any text, not empty."""


@dataclass(frozen=True)
class Outcome:
    """What the front end should do after a command."""

    action: str
    """"message" | "budget" | "open" | "load" | "cache" | "help" | "quit"."""
    message: str = ""
    """What to show on the notice line (for "open" and "load": the file)."""


@dataclass(frozen=True)
class Command:
    """A parsed command line."""

    name: str
    """Canonical name, without the slash: a key of :data:`COMMANDS`."""
    arg: str
    """The argument, stripped ("" when none)."""


@dataclass(frozen=True)
class SlashCommand:
    """One registry entry: everything about one command."""

    name: str
    """Typed after the slash."""
    arg: str
    """:data:`NO_ARG`, :data:`ONE_VALUE`, :data:`TEXT` or :data:`REQUIRED_TEXT`."""
    usage: str
    """How it is typed, e.g. ``/steps N``."""
    help: str
    """What it does, in a few words (the help screen)."""
    handler: Callable[[Any, str], Outcome]
    """(session, argument) -> Outcome; CommandError for a bad value."""
    aliases: tuple[str, ...] = ()
    """Other names that run it."""


def _number(text: str, kind: type) -> object:
    """``text`` as an int or float; unparsable text is passed on as it is, so the validator names
    the parameter in its message ("steps must be a whole number, got 'abc'")."""
    try:
        return kind(text)
    except ValueError:
        return text


# ---- handlers ---------------------------------------------------------------------------------


def _seed(session, arg: str) -> Outcome:
    session.set(seed=_number(arg, int))
    session.seed_locked = True
    return Outcome("message", f"seed {session.params.seed} (locked)")


def _steps(session, arg: str) -> Outcome:
    session.set(steps=_number(arg, int))
    return Outcome("message", f"steps {session.params.steps}")


def _cfg(session, arg: str) -> Outcome:
    session.set(cfg=_number(arg, float))
    return Outcome("message", f"CFG {session.params.cfg:g}")


def _eta(session, arg: str) -> Outcome:
    session.set(eta=_number(arg, float))
    return Outcome("message", f"eta {session.params.eta:g}")


def _size(session, arg: str) -> Outcome:
    try:
        width, height = parse_wh(arg, "size")
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    session.set(width=width, height=height)
    return Outcome("message", f"size {session.params.width}×{session.params.height}")


def _neg(session, arg: str) -> Outcome:
    session.set(negative=arg)
    return Outcome("message", f"negative prompt: {shorten(arg, 60)}" if arg else "negative prompt cleared")


def _budget(session, arg: str) -> Outcome:
    try:
        budget = parse_budget(arg, "budget")
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    session.budget = budget
    return Outcome("budget", "VRAM budget automatic" if budget is None else f"VRAM budget {format_bytes(budget, 'size')}")


def _open(session, arg: str) -> Outcome:
    if session.last_path is None:
        return Outcome("message", "nothing saved yet: render a prompt first")
    return Outcome("open", session.last_path)


def _help(session, arg: str) -> Outcome:
    return Outcome("help", help_line())


# ---- the registry -----------------------------------------------------------------------------

COMMANDS: dict[str, SlashCommand] = {
    c.name: c
    for c in (
        SlashCommand("seed", ONE_VALUE, "/seed N", f"set the seed (0 ... {MAX_SEED}) and lock it", _seed),
        SlashCommand("steps", ONE_VALUE, "/steps N", "DDIM steps (1 ... 1000)", _steps),
        SlashCommand("cfg", ONE_VALUE, "/cfg F", "guidance scale (0 ... 50; 1 = no guidance)", _cfg),
        SlashCommand("size", REQUIRED_TEXT, "/size WxH", "image size, multiples of 8, e.g. /size 512x768", _size),
        SlashCommand("neg", TEXT, "/neg TEXT", "negative prompt (/neg alone clears it)", _neg, ("negative",)),
        SlashCommand("eta", ONE_VALUE, "/eta F", "DDIM eta (0 ... 1)", _eta),
        SlashCommand("budget", ONE_VALUE, "/budget SIZE|auto",
                     f"VRAM budget, e.g. /budget 2G (at least {format_bytes(MIN_BUDGET, 'size')})", _budget),
        SlashCommand("open", NO_ARG, "/open", "show the last image's path", _open),
        SlashCommand("load", REQUIRED_TEXT, "/load IMAGE.png",
                     "take the prompt and settings stored in a PNG (sdterm or AUTOMATIC1111)",
                     lambda session, arg: Outcome("load", arg)),
        SlashCommand("cache", NO_ARG, "/cache", "show the prompt-embedding cache", lambda session, arg: Outcome("cache")),
        SlashCommand("help", NO_ARG, "/help", "show the commands and keys", _help, ("?",)),
        SlashCommand("quit", NO_ARG, "/quit", "leave sdterm", lambda session, arg: Outcome("quit"), ("exit", "q")),
    )
}
"""Every slash command, in the order /help lists them."""

ALIASES = {alias: c.name for c in COMMANDS.values() for alias in c.aliases}

_COMMAND_LIST = " ".join(f"/{name}" for name in COMMANDS)


def parse_command(text: str) -> Command | None:
    """``"/steps 30"`` -> Command("steps", "30"); None when ``text`` is not a command (does not
    start with "/"). CommandError (one line) for an unknown command or a missing or extra
    argument; the argument's value is checked by the command's handler."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    parts = stripped[1:].split(None, 1)
    name = parts[0].lower() if parts else ""
    arg = parts[1].strip() if len(parts) > 1 else ""
    if not name:
        raise CommandError(f"type a command after the slash: {_COMMAND_LIST}")
    name = ALIASES.get(name, name)
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean /{close[0]}?)" if close else ""
        raise CommandError(f"unknown command /{shorten(name, 20)}{hint}; commands: {_COMMAND_LIST}")
    command = COMMANDS[name]
    if command.arg == NO_ARG and arg:
        raise CommandError(f"/{name} takes no argument, got {shorten(arg)!r}")
    if command.arg in (ONE_VALUE, REQUIRED_TEXT) and not arg:
        raise CommandError(f"/{name} needs a value: {command.usage}")
    if command.arg == ONE_VALUE and len(arg.split()) > 1:
        raise CommandError(f"/{name} takes one value, got {shorten(arg)!r}: {command.usage}")
    return Command(name, arg)


def help_line() -> str:
    """One line listing the commands, for the notice line."""
    return " · ".join(c.usage for c in COMMANDS.values())


def complete(text: str) -> str | None:
    """The prompt box's completion of a partly typed command name: ``"/st"`` -> ``"/steps "`` (a
    space after a name that takes an argument); None when ``text`` is no command name's beginning."""
    if not text.startswith("/") or any(c.isspace() for c in text):
        return None
    typed = text[1:].lower()
    if not typed:
        return None
    for command in COMMANDS.values():
        if command.name.startswith(typed):
            return "/" + command.name + ("" if command.arg == NO_ARG else " ")
    return None
