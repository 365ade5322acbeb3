"""The slash commands typed into the app's prompt box, one registry entry each.

An entry (:class:`SlashCommand`) holds everything about a command: its name and aliases, the kind
of argument it takes, its usage and help text, and its handler. The parser
(:func:`parse_command`), :meth:`sdterm.session.Session.apply`, the ``/help`` line, the help screen
and the prompt box's completion all read :data:`COMMANDS`, so adding a command is one entry here.
The handlers of the commands that set a render parameter (``/seed`` ... ``/hires``), and
:class:`CommandError` and :class:`Outcome`, live in ``sdterm/commands_render.py``.

A handler gets the session and the argument and returns an :class:`Outcome`: what the front end
should do next, and the one string it needs:

- ``message``: show ``message`` on the notice line (a value was set).
- ``budget``: the VRAM budget changed; ``message`` says to what.
- ``open``: show the image at path ``message`` (``~`` expanded) in the image panel.
- ``load``: take the prompt and settings stored in the PNG at path ``message`` (``~`` expanded).
- ``recall``: ``message`` is a history entry's number (digits): restore that entry's parameters
  (``session.recall_entry(message).params``).
- ``history``: list the last ``message`` (digits) entries of the numbered history.
- ``model``: switch to the model named ``message``; ``""``: list the models.
- ``vae``: decode with the VAE ``message`` (a name in the vae folder, a path, ``default``); ``""``: list them.
- ``lora``: edit the prompt box's LoRA tags as :func:`edit_loras` does with ``message``.
- ``cache``, ``help``, ``quit``: show the embedding cache, show the commands (``message``: one line), leave.

A handler changes the session only through its public API (``params``, ``set``, ``seed_locked``,
``budget``, ``batch_count``, ``last_path``, ``recall_entry``) and raises :class:`CommandError` (one
line) with nothing changed for a bad value. ``!N`` typed in the prompt box is ``/recall N``.

:func:`complete` completes command names and the values of an entry's kind (``values``): "path" (PNG files and
folders) built in, others from the front end. No UI imports; nothing here imports the session.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from . import commands_render as render
from .commands_render import CommandError, Outcome, sampler_label
from .errors import ConfigError, shorten
from .params import MAX_BATCH, MAX_SEED
from .lora_edit import edit_loras
from .samplers import RNGS, SAMPLER_LIST, SCHEDULES
from .file_values import image_paths
from .units import MIN_BUDGET, format_bytes, parse_budget

__all__ = ["COMMANDS", "Command", "CommandError", "Outcome", "SlashCommand", "complete", "help_line", "parse_command",
           "sampler_label"]


NO_ARG, ONE_VALUE, OPTIONAL_VALUE, TEXT, REQUIRED_TEXT = "none", "value", "optional value", "text", "required text"
"""Argument kinds: nothing; exactly one word; one word or nothing; any text, maybe empty; any text, not empty."""

HISTORY_LENGTH = 20
"""How many entries ``/history`` lists without a number."""


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
    """:data:`NO_ARG`, :data:`ONE_VALUE`, :data:`OPTIONAL_VALUE`, :data:`TEXT` or :data:`REQUIRED_TEXT`."""
    usage: str
    """How it is typed, e.g. ``/steps N``."""
    help: str
    """What it does, in a few words (the help screen)."""
    handler: Callable[[Any, str], Outcome]
    """(session, argument) -> Outcome; CommandError for a bad value."""
    aliases: tuple[str, ...] = ()
    """Other names that run it."""
    values: str | None = None
    """The kind of value :func:`complete` completes for it ("path", "model", ...); None: none."""


# ---- handlers ---------------------------------------------------------------------------------


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
    if arg:
        path = os.path.expanduser(arg)
        if not os.path.isfile(path):
            raise CommandError(f"no image {shorten(arg)!r}")
        return Outcome("open", path)
    if session.last_path is None:
        return Outcome("message", "nothing saved yet: render a prompt first")
    return Outcome("open", session.last_path)


def _whole(text: str, name: str, lo: int, hi: int) -> int:
    """``text`` as a whole number in lo ... hi, else CommandError in the validator's words."""
    try:
        value = int(text)
    except ValueError:
        raise CommandError(f"{name} must be a whole number, got {shorten(text)!r}") from None
    if not lo <= value <= hi:
        raise CommandError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _fork(session, arg: str) -> Outcome:
    try:
        step = int(arg)
    except ValueError:
        raise CommandError(f"/fork K: K is a step number (0 ... steps - 1), got {arg!r}") from None
    if step < 0:
        raise CommandError(f"/fork K: K is a step number (0 ... steps - 1), got {step}")
    return Outcome("fork", str(step))


def _batch(session, arg: str) -> Outcome:
    session.batch_count = _whole(arg, "batch count", 1, MAX_BATCH)
    n = session.batch_count
    return Outcome("message", "one image per render" if n == 1 else f"{n} images per render (seed, seed+1, ...)")


def _history(session, arg: str) -> Outcome:
    return Outcome("history", str(_whole(arg, "history length", 1, 10**9) if arg else HISTORY_LENGTH))


def _recall(session, arg: str) -> Outcome:
    return Outcome("recall", str(session.recall_entry(arg)[0]))


def _draft(session, arg: str) -> Outcome:
    word = arg.lower()
    if word not in ("", "on", "off"):
        raise CommandError(f"/draft takes on or off (nothing: toggle), got {shorten(arg)!r}")
    if not session.set_draft(word == "on" if word else not session.draft):
        p = session.params
        return Outcome("message", f"draft off: renders use {sampler_label(p)} {p.steps} steps CFG {p.cfg:g}")
    d = session.draft_settings
    lora = f" + {session.draft_tag}" if d.lora else " (no LCM-LoRA: name one as draft.lora in sdterm.yaml)"
    return Outcome("message", f"draft on: renders use {d.sampler} {d.steps} steps cfg {d.cfg:g}{lora}; "
                              "F3 renders the image shown in full quality")


def _lora(session, arg: str) -> Outcome:
    try:
        edit_loras("", arg)  # the argument's own errors now, before the app edits the prompt box
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    return Outcome("lora", arg)


def _help(session, arg: str) -> Outcome:
    return Outcome("help", help_line())


# ---- the registry -----------------------------------------------------------------------------

COMMANDS: dict[str, SlashCommand] = {
    c.name: c
    for c in (
        SlashCommand("seed", ONE_VALUE, "/seed N", f"set the seed (0 ... {MAX_SEED}) and lock it", render.set_seed),
        SlashCommand("steps", ONE_VALUE, "/steps N", "sampling steps (1 ... 1000)", render.set_steps),
        SlashCommand("sampler", TEXT, "/sampler NAME", "sampler, e.g. /sampler DPM++ 2M Karras (/sampler alone lists them)",
                     render.set_sampler, values="sampler"),
        SlashCommand("schedule", TEXT, "/schedule NAME", "schedule type, e.g. /schedule Karras (Automatic: the sampler's)",
                     render.set_schedule, values="schedule"),
        SlashCommand("rng", OPTIONAL_VALUE, "/rng cpu|nv|gpu", "noise source (nv: A1111's GPU noise on any device)",
                     render.set_rng, values="rng"),
        SlashCommand("cfg", ONE_VALUE, "/cfg F", "guidance scale (0 ... 50; 1 = no guidance)", render.set_cfg),
        SlashCommand("size", REQUIRED_TEXT, "/size WxH", "image size, multiples of 8, e.g. /size 512x768", render.set_size),
        SlashCommand("n", ONE_VALUE, "/n N", f"images per render, seeds in a row (1 ... {MAX_BATCH})", _batch, ("batch",)),
        SlashCommand("neg", TEXT, "/neg TEXT", "negative prompt (/neg alone clears it)", _neg, ("negative",)),
        SlashCommand("eta", ONE_VALUE, "/eta F", "DDIM eta (0 ... 1)", render.set_eta),
        SlashCommand("clipskip", ONE_VALUE, "/clipskip N", "A1111's Clip skip (1 = CLIP's last layer; 2 for most anime models)",
                     render.set_clip_skip, ("clip-skip",)),
        SlashCommand("budget", ONE_VALUE, "/budget SIZE|auto",
                     f"VRAM budget, e.g. /budget 2G (at least {format_bytes(MIN_BUDGET, 'size')})", _budget),
        SlashCommand("open", TEXT, "/open [IMAGE.png]", "show the last image (or IMAGE.png) in the image panel",
                     _open, values="path"),
        SlashCommand("load", REQUIRED_TEXT, "/load IMAGE.png",
                     "take the prompt and settings stored in a PNG (sdterm or AUTOMATIC1111)",
                     lambda session, arg: Outcome("load", os.path.expanduser(arg)), values="path"),
        SlashCommand("init", REQUIRED_TEXT, "/init IMAGE|off", "img2img: start from IMAGE (off: noise)", render.set_init, values="path"),
        SlashCommand("strength", ONE_VALUE, "/strength S", "img2img denoising strength (0 ... 1; 0 keeps the image)", render.set_strength),
        SlashCommand("fork", ONE_VALUE, "/fork K", "render the last image again from its step K with the current prompt, "
                     "CFG or sampler (0 ... steps - 1)", _fork),
        SlashCommand("history", OPTIONAL_VALUE, "/history [N]", f"list the last N renders, numbered (default {HISTORY_LENGTH})",
                     _history),
        SlashCommand("recall", REQUIRED_TEXT, "/recall N|IMAGE.png",
                     "take the prompt and settings of history entry N (also !N) or of an image's render", _recall,
                     values="path"),
        SlashCommand("hires", TEXT, render.HIRES_USAGE,
                     "hires fix: render, upscale (2x, 1.5, or to WxH; Wx0 keeps the aspect), refine; "
                     "Latent upscalers or Lanczos/Nearest/None (/hires alone says what it is)", render.set_hires),
        SlashCommand("model", TEXT, "/model [NAME]", "switch to the model NAME (/model alone lists them)",
                     lambda session, arg: Outcome("model", arg), values="model"),
        SlashCommand("vae", TEXT, "/vae [NAME|PATH|default]",
                     "decode with a VAE of the vae folder or a file (default: the model's own; /vae alone lists them)",
                     lambda session, arg: Outcome("vae", arg), values="vae"),
        SlashCommand("lora", REQUIRED_TEXT, "/lora NAME[:W] | -NAME",
                     "add <lora:NAME:W> to the prompt (W 1), set its weight, or take it out (-NAME)", _lora, values="lora"),
        SlashCommand("verify", TEXT, "/verify [IMAGE.png]",
                     "render the last image (or IMAGE.png) again and compare: identical, within N levels or different, "
                     "and what differs from this machine", lambda session, arg: Outcome("verify", os.path.expanduser(arg)),
                     values="path"),
        SlashCommand("draft", OPTIONAL_VALUE, "/draft [on|off]",
                     "draft mode: renders use the draft settings (LCM 4 steps cfg 1.5), yours are kept (F2)", _draft),
        SlashCommand("cache", NO_ARG, "/cache", "show the prompt-embedding cache", lambda session, arg: Outcome("cache")),
        SlashCommand("help", NO_ARG, "/help", "show the commands and keys", _help, ("?",)),
        SlashCommand("quit", NO_ARG, "/quit", "leave sdterm", lambda session, arg: Outcome("quit"), ("exit", "q")),
    )
}
"""Every slash command, in the order /help lists them."""

ALIASES = {alias: c.name for c in COMMANDS.values() for alias in c.aliases}

_COMMAND_LIST = " ".join(f"/{name}" for name in COMMANDS)


_RECALL = re.compile(r"!([0-9]+)")
"""``!12``: history entry 12, as in a shell; any other text starting with "!" is a prompt."""


def parse_command(text: str) -> Command | None:
    """``"/steps 30"`` -> Command("steps", "30"), ``"!12"`` -> Command("recall", "12"); None when
    ``text`` is not a command (does not start with "/" and is not "!" and digits). CommandError (one
    line) for an unknown command or a missing or extra argument; the argument's value is checked by
    the command's handler."""
    stripped = text.strip()
    recall = _RECALL.fullmatch(stripped)
    if recall:
        return Command("recall", recall[1])
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
        more = f" (did you mean /{close[0]}?); /help lists them all" if close else f"; {_COMMAND_LIST}"
        raise CommandError(f"unknown command /{shorten(name, 12)}{more}")
    command = COMMANDS[name]
    if command.arg == NO_ARG and arg:
        raise CommandError(f"/{name} takes no argument, got {shorten(arg)!r}")
    if command.arg in (ONE_VALUE, REQUIRED_TEXT) and not arg:
        raise CommandError(f"/{name} needs a value: {command.usage}")
    if command.arg in (ONE_VALUE, OPTIONAL_VALUE) and len(arg.split()) > 1:
        raise CommandError(f"/{name} takes one value, got {shorten(arg)!r}: {command.usage}")
    return Command(name, arg)


def help_line() -> str:
    """One line listing the commands, for the notice line."""
    return " · ".join(c.usage for c in COMMANDS.values())


ValueSource = Callable[[str], Iterable[str]]
"""Candidates for a partly typed value, given what is typed so far (:func:`complete` keeps those that start with it)."""


_SAMPLER_NAMES = [s.name for s in SAMPLER_LIST] + [f"{s.name} {schedule}" for s in SAMPLER_LIST if s.k_diffusion
                                                   for schedule in SCHEDULES[2:]]
"""Completion candidates of /sampler: the names, then the combined names (Karras, Exponential...)."""

VALUE_SOURCES: dict[str, ValueSource] = {"path": image_paths, "sampler": lambda typed: _SAMPLER_NAMES,
                                         "schedule": lambda typed: SCHEDULES, "rng": lambda typed: RNGS}
"""Built-in kinds of value; :func:`complete`'s ``values`` adds to them (and may replace them)."""


def complete(text: str, values: Mapping[str, ValueSource] | None = None) -> str | None:
    """The prompt box's completion of ``text``, or None when there is nothing to add.

    A partly typed command name: ``"/st"`` -> ``"/steps "`` (a space after a name that takes an
    argument; the first in the registry's order). A partly typed value of a command whose entry
    names a kind of value (:attr:`SlashCommand.values`), from :data:`VALUE_SOURCES` and ``values``
    (kind -> callable given the typed value, returning candidates): ``"/model de"`` -> ``"/model
    demo"``, ``"/open out/000"`` -> ``"/open out/00042-1234.png"``. One candidate completes whole;
    several complete as far as they agree, and once they agree no further, to the first longer one.
    """
    if not text.startswith("/"):
        return None
    split = re.match(r"/(\S*)(\s+)(.*)\Z", text, re.DOTALL)
    if split is None:
        typed = text[1:].lower()
        for command in COMMANDS.values() if typed else ():
            if command.name.startswith(typed):
                return "/" + command.name + ("" if command.arg == NO_ARG else " ")
        return None
    name = split[1].lower()
    command = COMMANDS.get(ALIASES.get(name, name))
    typed = split[3]
    if command is None or command.values is None or (command.arg in (ONE_VALUE, OPTIONAL_VALUE) and " " in typed):
        return None
    source = {**VALUE_SOURCES, **(values or {})}.get(command.values)
    best = _pick(typed, list(source(typed)) if source else [])
    return None if best is None or best == typed else text[: split.start(3)] + best


def _pick(typed: str, candidates: list[str]) -> str | None:
    """The completion of ``typed`` among ``candidates`` (case-insensitive if no case matches)."""
    matches = [c for c in candidates if c.startswith(typed)] or [c for c in candidates if c.lower().startswith(typed.lower())]
    if not matches:
        return None
    common = os.path.commonprefix(matches)
    return common if len(common) > len(typed) else next((m for m in matches if len(m) > len(typed)), None)
