"""The slash commands that set a render parameter (``/seed``, ``/steps``, ``/sampler``, ``/size``,
``/init``, ``/strength``, ``/hires``...): their handlers, and what every handler speaks in
(:class:`CommandError`, :class:`Outcome`). The registry that names them is ``sdterm/commands.py``
(which also exports :class:`CommandError` and :class:`Outcome`).

A handler gets the session and the argument, sets the session's parameters through
``session.set`` (the one validator), and returns an :class:`Outcome`; CommandError (one line),
with nothing changed, for a bad value. No UI imports; nothing here imports the session.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ConfigError, shorten
from .infotext_hires import number_text, upscaler_name
from .params import HIRES_UPSCALERS, Params, hires_size
from .samplers import RNGS, SAMPLERS, SCHEDULES, combined_name, resolve_schedule, schedule_name, split_sampler
from .units import parse_wh


class CommandError(ValueError):
    """A slash command or its value is not valid; the message is one line meant for the user."""


@dataclass(frozen=True)
class Outcome:
    """What the front end should do after a command."""

    action: str
    """"message", "budget", "open", "load", "recall", "history", "model", "vae", "lora", "cache", "help", "quit",
    "fork"."""
    message: str = ""
    """The notice line's text; the file ("open", "load"), entry number ("recall"), count ("history"), name ("model")."""


def number(text: str, kind: type) -> object:
    """``text`` as an int or float; unparsable text is passed on as it is, so the validator names
    the parameter in its message ("steps must be a whole number, got 'abc'")."""
    try:
        return kind(text)
    except ValueError:
        return text


def set_seed(session, arg: str) -> Outcome:
    session.set(seed=number(arg, int))
    session.seed_locked = True
    return Outcome("message", f"seed {session.params.seed} (locked)")


def set_steps(session, arg: str) -> Outcome:
    session.set(steps=number(arg, int))
    return Outcome("message", f"steps {session.params.steps}")


def set_cfg(session, arg: str) -> Outcome:
    session.set(cfg=number(arg, float))
    return Outcome("message", f"CFG {session.params.cfg:g}")


def set_eta(session, arg: str) -> Outcome:
    session.set(eta=number(arg, float))
    return Outcome("message", f"eta {session.params.eta:g}")


def sampler_label(p: Params) -> str:
    """The sampler as the parameter line and the notices name it: "DPM++ 2M Karras" (with the
    schedule it runs, its own default included), "Euler a", "DDIM" (no schedule applies)."""
    return combined_name(p.sampler, resolve_schedule(p.sampler, p.schedule))


def set_sampler(session, arg: str) -> Outcome:
    if not arg:
        return Outcome("message", f"sampler {sampler_label(session.params)}; /sampler NAME: {', '.join(SAMPLERS)}")
    split = split_sampler(arg)
    if split is None:
        raise CommandError(f"unknown sampler {shorten(arg)!r}; one of: {', '.join(SAMPLERS)}")
    name, schedule = split  # a combined name ("LMS Karras") sets the schedule; a bare one keeps it
    if schedule is not None and schedule == SAMPLERS[name].default_schedule:
        schedule = "Automatic"
    session.set(sampler=name, **({} if schedule is None else {"schedule": schedule}))
    return Outcome("message", f"sampler {sampler_label(session.params)}")


def set_schedule(session, arg: str) -> Outcome:
    if not arg:
        return Outcome("message", f"schedule {session.params.schedule}; /schedule NAME: {', '.join(SCHEDULES)}")
    name = schedule_name(arg)
    if name is None:
        raise CommandError(f"unknown schedule {shorten(arg)!r}; one of: {', '.join(SCHEDULES)}")
    session.set(schedule=name)
    p = session.params
    unused = "" if SAMPLERS[p.sampler].k_diffusion else f" (not used by {p.sampler}: it brings its own timesteps)"
    return Outcome("message", f"schedule {name}: sampler {sampler_label(p)}{unused}")


def set_clip_skip(session, arg: str) -> Outcome:
    session.set(clip_skip=number(arg, int))
    n = session.params.clip_skip
    return Outcome("message", "clip skip 1 (CLIP's last layer)" if n == 1 else f"clip skip {n}")


def set_rng(session, arg: str) -> Outcome:
    if not arg:
        return Outcome("message", f"rng {session.params.rng}; /rng NAME: {', '.join(RNGS)}")
    if arg.lower() not in RNGS:
        raise CommandError(f"unknown rng {shorten(arg)!r}; one of: {', '.join(RNGS)}")
    session.set(rng=arg.lower())
    return Outcome("message", f"rng {arg.lower()}")


def set_size(session, arg: str) -> Outcome:
    try:
        width, height = parse_wh(arg, "size")
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    session.set(width=width, height=height)
    return Outcome("message", f"size {session.params.width}×{session.params.height}")


def set_init(session, arg: str) -> Outcome:
    if arg.lower() == "off":
        session.set(init_image="")
        return Outcome("message", "init image off: renders start from noise (text-to-image)")
    if session.params.hires:
        raise CommandError("img2img with the hires fix on: /hires off first (the hires fix renders text-to-image)")
    path = os.path.expanduser(arg)
    if "\0" not in path and not os.path.isfile(path):  # a NUL is the validator's to name
        raise CommandError(f"init image {shorten(arg)!r}: no such file; check the path")
    p = session.set(init_image=os.path.abspath(path))
    return Outcome("message", f"img2img from {os.path.basename(path)}, strength {p.strength:.2f}")


def set_strength(session, arg: str) -> Outcome:
    p = session.set(strength=number(arg, float))
    return Outcome("message", f"denoising strength {p.strength:.2f}" + ("" if p.init_image else " (used with /init)"))


_HIRES_WORD = re.compile(r"(steps|strength|upscaler)=(.*)", re.IGNORECASE | re.DOTALL)
_HIRES_SPLIT = re.compile(r"\s+(?=(?:steps|strength|upscaler)=)", re.IGNORECASE)
"""Splits ``steps=10 upscaler=latent (bicubic) strength=0.5`` before each key (a name may hold blanks)."""
HIRES_USAGE = "/hires 2x|1024x1536|off [steps=N] [strength=S] [upscaler=NAME]"


def hires_summary(p: Params) -> str:
    """``2x→1024x1536 Latent 0.70`` (``1024x0→1024x1536 ...`` for a size): what the hires fix does."""
    how = f"{p.hires_width}x{p.hires_height}" if p.hires_width or p.hires_height else f"{number_text(p.hires_scale)}x"
    w, h = hires_size(p)
    steps = f" {p.hires_steps} steps" if p.hires_steps else ""
    return f"{how}→{w}x{h} {p.hires_upscaler}{steps} {p.hires_strength:.2f}"


def set_hires(session, arg: str) -> Outcome:
    """``/hires 2x``, ``/hires 1.5``, ``/hires 1024x1536`` (``1024x0``: one side), ``/hires off``,
    each with optional ``steps=N strength=S upscaler=NAME`` in any order (a name may hold blanks:
    ``upscaler=latent (bicubic)``), or those alone; ``/hires`` alone says what it is now."""
    p = session.params
    if not arg:
        return Outcome("message", f"hires {hires_summary(p)}" if p.hires else f"hires fix off; {HIRES_USAGE}")
    changes: dict = {}
    words = arg.split()
    first = words[0].lower()
    if "=" not in first:
        words = words[1:]
        if first == "off":
            changes.update(hires_scale=0.0, hires_width=0, hires_height=0)
        elif re.fullmatch(r"[0-9.]+[x×]?", first):
            changes.update(hires_scale=number(first.rstrip("x×"), float), hires_width=0, hires_height=0)
        else:
            try:
                changes["hires_width"], changes["hires_height"] = parse_wh(first, "hires size")
            except ConfigError:
                raise CommandError(f"/hires takes a scale (2x, 1.5), a size (1024x1536) or off, got {shorten(first)!r}: "
                                   f"{HIRES_USAGE}") from None
            if (changes["hires_width"], changes["hires_height"]) == (0, 0):
                raise CommandError("hires size 0x0 gives no size; name a width, a height or both (/hires 1024x0)")
            changes["hires_scale"] = 0.0
    rest = " ".join(words)
    for word in _HIRES_SPLIT.split(rest) if rest else ():
        m = _HIRES_WORD.fullmatch(word)
        if m is None:
            raise CommandError(f"/hires: expected steps=N, strength=S or upscaler=NAME, got {shorten(word)!r}")
        key, value = m[1].lower(), m[2].strip()
        if key == "upscaler":
            changes["hires_upscaler"] = upscaler_name(value)
            if changes["hires_upscaler"] is None:
                raise CommandError(f"unknown hires upscaler {shorten(value)!r}; one of: {', '.join(HIRES_UPSCALERS)}")
        else:
            changes["hires_" + key] = number(value, int if key == "steps" else float)
    if p.init_image and p.replace(**changes).hires:
        raise CommandError("the hires fix renders text-to-image: /init off first (for img2img at a larger size: "
                           "/size and /strength)")
    p = session.set(**changes)
    if not p.hires:
        return Outcome("message", "hires fix off")
    return Outcome("message", f"hires {hires_summary(p)}: renders {p.width}x{p.height}, then upscales and refines")
