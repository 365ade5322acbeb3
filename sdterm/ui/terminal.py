"""Terminal graphics set-up that must happen before Textual starts.

textual-image asks the terminal what it can draw when it is first imported, which is only
possible before Textual owns stdin. Inside tmux, Kitty graphics commands must travel through
tmux's passthrough (``ESC P tmux; ... ESC \\`` with every ESC doubled; tmux needs
``set -g allow-passthrough on``); the image itself is placed with Unicode placeholders, which
tmux treats as ordinary text, so it moves and scrolls with the pane.
"""

from __future__ import annotations

import os
import sys

TMUX_START = "\x1bPtmux;"
TMUX_END = "\x1b\\"


def tmux_wrap(sequence: str) -> str:
    return TMUX_START + sequence.replace("\x1b", "\x1b\x1b") + TMUX_END


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


def prepare_graphics() -> None:
    """Call once before the app starts: tmux passthrough, then textual-image's detection."""
    enable_tmux_passthrough()
    import textual_image.widget  # noqa: F401  (the import runs the terminal queries)
