"""Terminal graphics set-up that must happen before Textual starts (Textual owns stdin after).

Inside tmux, Kitty graphics commands must travel through tmux's passthrough (``ESC P tmux; ... ESC \\``
with every ESC doubled; tmux needs ``set -g allow-passthrough on``); the image itself is placed with
Unicode placeholders, which tmux treats as ordinary text, so it moves and scrolls with the pane.

sdterm detects what the terminal draws itself (:func:`detect_protocol`), after the passthrough is in
place: textual-image's detection runs when its renderables are first imported, before any wrapper
could be installed (so inside tmux the Kitty query was swallowed), and waits 0.1 s per query. Here
one burst asks everything (the Kitty graphics query, XTVERSION, the cell size) and ends with DA1,
which every terminal answers: the answers before it are all there will be, so the wait
(:data:`QUERY_TIMEOUT`, for a cold terminal over SSH) is only paid when the terminal answers
nothing. Inside tmux, tmux answers DA1 and XTVERSION itself, the wrapped Kitty query is answered by
the outer terminal a few milliseconds later, and the outer terminal's name comes from tmux
(``#{client_termtype}``).

Kitty draws Unicode placeholders from version 0.28 on; an older kitty would show a grid of empty
boxes, so it gets Sixel where it has it, else half-block cells (:func:`choose_protocol`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable

TMUX_START = "\x1bPtmux;"
TMUX_END = "\x1b\\"
QUERY_TIMEOUT = 1.0
"""Seconds to wait for a terminal that answers nothing at all (a cold terminal over SSH answers
within a few hundred milliseconds)."""
TMUX_GRACE = 0.25
"""Inside tmux, how long the wrapped Kitty query may take after tmux answered DA1, when tmux says
the outer terminal is not one that speaks Kitty graphics."""
KITTY_PLACEHOLDERS = (0, 28)
"""The first kitty version that draws Unicode placeholders."""
KITTY_QUERY = "\x1b_Gi=31,s=1,v=1,a=q,t=d,f=24;AAAA\x1b\\"
XTVERSION = "\x1b[>q"
CELL_SIZE = "\x1b[16t"
DA1 = "\x1b[c"
DA1_ANSWER = re.compile(r"\x1b\[\?([0-9;]*)c")
KITTY_ANSWER = re.compile(r"\x1b_Gi=31;([^\x1b]*)\x1b\\")
XTVERSION_ANSWER = re.compile(r"\x1bP>\|([^\x1b]*)\x1b\\")
CELL_ANSWER = re.compile(r"\x1b\[6;(\d+);(\d+)t")
KITTY_LIKE = ("kitty", "ghostty")
"""Terminals (by XTVERSION name) that draw Kitty graphics placed with Unicode placeholders."""

_detected: str | None = None


def tmux_wrap(sequence: str) -> str:
    return TMUX_START + sequence.replace("\x1b", "\x1b\x1b") + TMUX_END


def detected_protocol() -> str | None:
    """What :func:`prepare_graphics` found ('sixel', 'kitty', 'halfcell', 'unicode'); None before."""
    return _detected


def kitty_version(name: str) -> tuple[int, ...] | None:
    """``kitty(0.26.5)`` → (0, 26, 5); None for another terminal or no version."""
    match = re.fullmatch(r"\s*kitty[ (]*([0-9][0-9.]*)\)?\s*", name or "")
    return tuple(int(p) for p in match.group(1).strip(".").split(".")) if match else None


def choose_protocol(*, sixel: bool, kitty: bool, name: str, env: dict) -> str:
    """The best protocol the answers allow. Sixel first (terminals that speak both draw it
    right, and some that report Kitty graphics don't draw its placeholders); Kitty graphics only
    where the terminal draws placeholders: kitty 0.28 or newer (a kitty that gave no version, or
    TERM=xterm-kitty / KITTY_WINDOW_ID with no name, is taken as older) or another kitty-like one."""
    if sixel:
        return "sixel"
    if kitty:
        version = kitty_version(name)
        if version is not None:
            return "kitty" if version >= KITTY_PLACEHOLDERS else "halfcell"
        if name and name.split("(")[0].strip().lower().startswith(KITTY_LIKE):
            return "kitty"
        if env.get("TERM") == "xterm-kitty" or env.get("KITTY_WINDOW_ID") or not name:
            return "halfcell"
        return "kitty"
    return "halfcell"


class Answers:
    """What the terminal answered to :func:`ask_terminal`'s burst."""

    def __init__(self, text: str) -> None:
        self.text = text
        da1 = DA1_ANSWER.search(text)
        self.da1 = da1 is not None
        self.sixel = bool(da1) and "4" in da1.group(1).split(";")
        kitty = KITTY_ANSWER.search(text)
        self.kitty = bool(kitty) and kitty.group(1) == "OK"
        version = XTVERSION_ANSWER.search(text)
        self.name = version.group(1) if version else ""
        cell = CELL_ANSWER.search(text)
        self.cell = (int(cell.group(2)), int(cell.group(1))) if cell else None
        """(width, height) of a cell in pixels."""


def ask_terminal(write: Callable[[str], None], read: Callable[[float], str], *, tmux: bool,
                 grace: float = TMUX_GRACE, timeout: float = QUERY_TIMEOUT) -> Answers:
    """Send the queries in one burst, ending with DA1, and read the answers until DA1's (and, in
    tmux, the wrapped Kitty answer or ``grace`` more seconds), or ``timeout`` seconds of nothing.
    ``read(seconds)`` returns what arrived within that time ('' if nothing)."""
    kitty = tmux_wrap(KITTY_QUERY) if tmux else KITTY_QUERY
    write(kitty + ("" if tmux else XTVERSION) + CELL_SIZE + DA1)
    text, extended = "", False
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        text += read(left)
        if DA1_ANSWER.search(text):
            if not tmux or KITTY_ANSWER.search(text):
                break
            if not extended:  # tmux answered; the outer terminal's Kitty answer may follow
                deadline, extended = min(deadline, time.monotonic() + grace), True
    return Answers(text)


def tmux_client_termtype() -> str:
    """The outer terminal's name and version as tmux learnt it (XTVERSION), e.g. kitty(0.26.5)."""
    try:
        out = subprocess.run(["tmux", "display-message", "-p", "#{client_termtype}"], capture_output=True,
                             text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def detect_protocol(write, read, env: dict) -> tuple[str, Answers]:
    """Ask the terminal (through tmux's passthrough inside tmux) and choose the protocol."""
    tmux = bool(env.get("TMUX"))
    name = tmux_client_termtype() if tmux else ""
    grace = QUERY_TIMEOUT if (not name or name.lower().startswith(KITTY_LIKE)) else TMUX_GRACE
    answers = ask_terminal(write, read, tmux=tmux, grace=grace)
    if tmux:
        answers.name = name
    return choose_protocol(sixel=answers.sixel, kitty=answers.kitty, name=answers.name, env=env), answers


def enable_tmux_passthrough() -> bool:
    """Route textual-image's Kitty graphics messages through tmux; True if inside tmux."""
    if not os.environ.get("TMUX"):
        return False
    from textual_image.renderable import tgp

    if getattr(tgp._send_tgp_message, "sdterm_tmux", False):
        return True
    original = tgp._send_tgp_message

    def send(*, payload: str | None = None, **kwargs) -> None:
        real = sys.__stdout__

        class Capture:
            def __init__(self) -> None:
                self.parts: list[str] = []

            def write(self, text: str) -> int:
                self.parts.append(text)
                return len(text)

            def flush(self) -> None:
                pass

        capture = Capture()
        sys.__stdout__ = capture
        try:
            original(payload=payload, **kwargs)
        finally:
            sys.__stdout__ = real
        real.write(tmux_wrap("".join(capture.parts)))
        real.flush()

    send.sdterm_tmux = True
    tgp._send_tgp_message = send
    return True


@contextmanager
def _quiet_stdout():
    """textual-image asks the terminal when its renderables are first imported, unless stdout is
    not a terminal: sdterm asks itself, later (see the module's docstring)."""
    real = sys.__stdout__

    class NotATerminal:
        def isatty(self) -> bool:
            return False

    sys.__stdout__ = NotATerminal()
    try:
        yield
    finally:
        sys.__stdout__ = real


def _tty_io():
    """write and read on the controlling terminal, stdin in cbreak mode while asking."""
    import select
    import termios
    import tty

    fd = sys.__stdin__.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd, termios.TCSANOW)

    def write(text: str) -> None:
        sys.__stdout__.write(text)
        sys.__stdout__.flush()

    def read(seconds: float) -> str:
        ready, _, _ = select.select([fd], [], [], seconds)
        return os.read(fd, 4096).decode(errors="replace") if ready else ""

    def restore() -> None:
        termios.tcsetattr(fd, termios.TCSANOW, saved)

    return write, read, restore


def prepare_graphics(protocol: str | None = "auto") -> str:
    """Call once before the app starts: the tmux passthrough, then (for ``auto``) the detection.
    Returns the protocol the app should use ('auto' is resolved where stdin/stdout are a terminal)."""
    global _detected
    with _quiet_stdout():
        import textual_image.renderable  # noqa: F401  (its own queries skipped)
    enable_tmux_passthrough()
    protocol = protocol or "auto"
    interactive = sys.__stdin__ and sys.__stdout__ and sys.__stdin__.isatty() and sys.__stdout__.isatty()
    answers = None
    if protocol == "auto" and interactive:
        write, read, restore = _tty_io()
        try:
            protocol, answers = detect_protocol(write, read, dict(os.environ))
        finally:
            restore()
        _detected = protocol
    if answers is not None and answers.cell:
        _seed_cell_size(*answers.cell)
    import textual_image.widget  # noqa: F401  (measures the cell size: ioctl, else the answer above)

    return protocol


def _seed_cell_size(width: int, height: int) -> None:
    """Give textual-image the cell size the terminal answered, where the window size ioctl has no
    pixels (its own query would wait 0.1 s more)."""
    from textual_image import _terminal

    try:
        from textual_image._posix import get_tiocgwinsz

        rows, columns, pixel_width, pixel_height = get_tiocgwinsz()
        if rows and columns and pixel_width and pixel_height:
            return
    except (OSError, ImportError):
        pass
    if width > 0 and height > 0:
        _terminal.get_cell_size._result = _terminal.CellSize(width, height)
