"""Kitty graphics inside tmux go through tmux's passthrough."""

from __future__ import annotations

import io
import sys

from sdterm.ui.terminal import enable_tmux_passthrough, tmux_wrap


def test_tmux_wrap_doubles_escapes():
    assert tmux_wrap("\x1b_Ga=q;AAAA\x1b\\") == "\x1bPtmux;\x1b\x1b_Ga=q;AAAA\x1b\x1b\\\x1b\\"


def test_outside_tmux_nothing_changes(monkeypatch):
    monkeypatch.delenv("TMUX", raising=False)
    assert enable_tmux_passthrough() is False


def test_inside_tmux_kitty_messages_are_wrapped(monkeypatch):
    from textual_image.renderable import tgp

    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    monkeypatch.setattr(tgp, "_send_tgp_message", tgp._send_tgp_message)
    out = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", out)
    assert enable_tmux_passthrough() is True
    tgp._send_tgp_message(a="p", i=7, q=2)
    assert out.getvalue() == tmux_wrap("\x1b_Ga=p,i=7,q=2\x1b\\")
