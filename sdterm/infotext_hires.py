"""The hires fix in AUTOMATIC1111's infotext, written and read as A1111 1.10 does
(``modules/processing.py``: ``StableDiffusionProcessingTxt2Img.init`` and
``calculate_target_resolution``), apart from ``pngmeta.py``, which calls :func:`hires_pairs` and
:func:`read_hires`; ``show.py`` and the app's ``/load`` word their notes with :func:`hires_notes`.

What A1111 writes for a hires render: ``Size`` stays the first pass's size; ``Denoising strength:
<the hires pass's strength>`` in its fixed slot (``infotext_sampler.tail_pairs``); then, among the
extra generation parameters, ``Hires upscale: 2`` (an integral scale without ".0", else the float's
repr: ``1.5``) or, when a target size is given, ``Hires resize: 1024x1536`` (both sides as given,
zeros included) instead; ``Hires steps: N`` only when it isn't 0; ``Hires upscaler: NAME`` always.

Read back: ``Hires upscale`` (``2`` or ``2.0``) / ``Hires resize`` turn the hires fix on, and the
``Denoising strength`` becomes the hires pass's. An upscaler sdterm doesn't have (ESRGAN models,
"R-ESRGAN 4x+", "4x-UltraSharp"...) reads as "Lanczos", the name staying in the leftover settings
for the note. The other ``Hires ...`` keys (a hires sampler, prompt, schedule, CFG, checkpoint)
are not supported: they stay in the leftover settings, and :func:`hires_notes` names them.
"""

from __future__ import annotations

import math
from typing import Any

from .params import HIRES_UPSCALERS, Params
from .units import parse_wh

UPSCALE, RESIZE, STEPS, UPSCALER = "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler"
STRENGTH = "Denoising strength"
FALLBACK_UPSCALER = "Lanczos"
"""What an upscaler sdterm doesn't have reads as: the nearest honest thing among the built-in ones."""


def number_text(x: float) -> str:
    """A1111's ``str()`` of a scale as its UI hands it over: ``2`` for 2.0, ``1.5``."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def hires_pairs(p: Params) -> list[str]:
    """The ``Hires ...`` pairs of ``p`` (none when the hires fix is off), in A1111's order."""
    if not p.hires:
        return []
    if p.hires_width or p.hires_height:
        out = [f"{RESIZE}: {p.hires_width}x{p.hires_height}"]
    else:
        out = [f"{UPSCALE}: {number_text(p.hires_scale)}"]
    if p.hires_steps:
        out.append(f"{STEPS}: {p.hires_steps}")
    return out + [f"{UPSCALER}: {p.hires_upscaler}"]  # the names hold no ',', ':' or newline: never quoted


def _number(text: str | None, kind: type) -> Any:
    text = (text or "").strip()
    if not text or len(text) > 40 or "_" in text:
        return None
    try:
        value = kind(text)
    except (ValueError, OverflowError):
        return None
    return value if kind is int or math.isfinite(value) else None


def upscaler_name(text: str) -> str | None:
    """The :data:`~sdterm.params.HIRES_UPSCALERS` name ``text`` spells in any case (blanks
    normalised); None for none."""
    key = " ".join(str(text).split()).casefold()
    return next((name for name in HIRES_UPSCALERS if name.casefold() == key), None)


def read_hires(settings: dict[str, str], strength: float | None) -> tuple[dict[str, Any], set[str]]:
    """(the hires fields, the settings keys they used) from a text's settings; ``strength``: the
    ``Denoising strength`` read, which is the hires pass's when the hires fix is on. Nothing when
    neither ``Hires upscale`` nor ``Hires resize`` can be read (the keys then stay as text)."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    scale = _number(settings.get(UPSCALE), float)
    if scale is not None:
        out["hires_scale"], used = scale, {UPSCALE}
    if RESIZE in settings:
        try:
            size = parse_wh(settings[RESIZE], "hires resize")
        except ValueError:
            size = (0, 0)
        if size != (0, 0):
            out["hires_width"], out["hires_height"] = size
            used.add(RESIZE)
    if not out:
        return {}, set()
    steps = _number(settings.get(STEPS), int)
    if steps is not None:
        out["hires_steps"] = steps
        used.add(STEPS)
    if UPSCALER in settings:
        name = upscaler_name(settings[UPSCALER])
        out["hires_upscaler"] = name or FALLBACK_UPSCALER
        if name is not None:
            used.add(UPSCALER)  # an unknown one stays in the settings: hires_notes names it
    if strength is not None:
        out["hires_strength"] = strength
        used.add(STRENGTH)
    return out, used


_NOT_SUPPORTED = {"Hires sampler": "sampler", "Hires schedule type": "schedule", "Hires prompt": "prompt",
                  "Hires negative prompt": "negative prompt", "Hires CFG Scale": "CFG scale",
                  "Hires checkpoint": "model"}


def hires_notes(extra: dict[str, str], hires_on: bool) -> list[str]:
    """One line for each ``Hires ...`` setting left in ``extra`` (what sdterm can't reproduce)."""
    out: list[str] = []
    for key, value in extra.items():
        if not key.startswith("Hires"):
            continue
        if key == UPSCALER and hires_on:
            out.append(f"hires upscaler {value}: sdterm has only the built-in ones (no ESRGAN); "
                       f"{FALLBACK_UPSCALER} is used")
        elif key in _NOT_SUPPORTED:
            out.append(f"{key} {value!r}: not supported; the hires pass uses the main {_NOT_SUPPORTED[key]}")
        elif hires_on:
            out.append(f"{key} {value!r}: not supported")
    if not hires_on and any(k.startswith("Hires") for k in extra):
        out.append("hires fix settings that can't be read: sdterm renders at the recorded size only")
    return out
