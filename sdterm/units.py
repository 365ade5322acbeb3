"""Units everyone uses: byte sizes (read and written), WIDTHxHEIGHT, and the smallest VRAM budget.

A leaf (it imports only :mod:`sdterm.errors`): the engine, the command line, the app and the
settings all read sizes and print bytes through these few functions, so ``1G`` means the same
everywhere and a number of bytes looks the same in every report of one kind.
"""

from __future__ import annotations

import re

from .errors import ConfigError, shorten

KiB, MiB, GiB = 2**10, 2**20, 2**30

MIN_BUDGET = 256 * MiB
"""The smallest VRAM budget accepted (``--vram-budget``, ``/budget``, ``defaults.budget``)."""

_SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "KI": KiB, "MI": MiB, "GI": GiB}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?)?B?\s*", re.IGNORECASE)
_WH_RE = re.compile(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*", re.IGNORECASE)


def parse_size(text: str | int, what: str = "size") -> int:
    """'256M', '1.5G', '512MiB', '1000000' -> bytes. K, M and G are binary (1G = 1 GiB), as GPU
    memory is counted by nvidia-smi and torch. ConfigError naming ``what`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE_RE.fullmatch(str(text))
        if not m:
            raise ConfigError(f"{what} must be a size such as 256M or 1.5G, got {text!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if value < 0:
        raise ConfigError(f"{what} must not be negative, got {text!r}")
    return value


def parse_budget(text: str | None, what: str = "budget") -> int | None:
    """A VRAM budget: 'auto', 'none' or nothing -> None (the engine decides from the free memory);
    else a size of at least :data:`MIN_BUDGET`. ConfigError naming ``what`` otherwise."""
    if text is None or str(text).strip().lower() in ("", "none", "auto"):
        return None
    budget = parse_size(text, what)
    if budget < MIN_BUDGET:
        raise ConfigError(f"{what} must be at least {format_bytes(MIN_BUDGET, 'size')}, got {shorten(text)}")
    return budget


def parse_wh(text: str, what: str = "size") -> tuple[int, int]:
    """'512x768' (also 'X', '×' or '*', blanks around them allowed) -> (512, 768).

    Only the form is checked here; whether a size can be rendered is the parameter validator's to say.
    ConfigError naming ``what`` when ``text`` is not WIDTHxHEIGHT.
    """
    m = _WH_RE.fullmatch(str(text))
    if m:
        try:
            return int(m.group(1)), int(m.group(2))
        except ValueError:  # more digits than int() converts
            pass
    raise ConfigError(f"{what} must be WIDTHxHEIGHT such as 512x768, got {shorten(text)!r}")


def format_bytes(n: int | None, style: str = "long") -> str:
    """``n`` bytes in binary units, in one of three styles:

    * ``"long"`` (reports: ``generate``, ``bench``, ``doctor``, ``cache``): '1.50 GiB', '900 MiB', '12 KiB';
    * ``"short"`` (narrow columns: the app's stage panel): '1.50G', '900M';
    * ``"size"`` (a size as the user types it, read back by :func:`parse_size`): '1.5G', '256M', '12K', '100B'.

    None (nothing measured) is '-' ('–' in the short style).
    """
    if style == "size":
        if n is None:
            return "-"
        for unit, size in (("G", GiB), ("M", MiB), ("K", KiB)):
            if n >= size:
                return f"{n / size:.2f}".rstrip("0").rstrip(".") + unit
        return f"{n}B"
    if style == "short":
        if n is None:
            return "–"
        return f"{n / GiB:.2f}G" if n >= GiB else f"{n / MiB:.0f}M"
    if style != "long":
        raise ValueError(f"unknown style {style!r}")
    if n is None:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / KiB:.0f} KiB"
