"""The real app in a pseudo-terminal whose other end is a fake graphics terminal (this file): it
answers the queries a Sixel terminal (xterm in VT340 mode) or kitty answers, and counts what the app
writes. One render must send its picture once; the bytes per render are the README's figure.

    python tests/test_graphics_pty.py MODEL_DIR [sixel|kitty|halfcell] [WIDTHxHEIGHT]

prints the bytes written per render (for the README)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIXEL_START = re.compile(rb"\x1bP[0-9;]*q")
KITTY_PAYLOAD = re.compile(rb"\x1b_G[^;\x1b]*f=100[^;\x1b]*;")
ROWS, COLS, CELL_W, CELL_H = 40, 120, 10, 20


class FakeTerminal:
    """The app on a pty; :meth:`pump` answers its queries (DA1, kitty's graphics query, XTVERSION,
    the cell size) as ``kind`` would and keeps everything it wrote in :attr:`out`."""

    def __init__(self, argv: list[str], kind: str, env: dict, version: str = "kitty(0.35.2)") -> None:
        self.kind, self.version = kind, version
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, COLS * CELL_W, ROWS * CELL_H))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO,
                                     start_new_session=True)
        os.close(slave)
        self.master = master
        self.out = bytearray()
        self._scanned = 0

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _answer(self) -> None:
        new = bytes(self.out[self._scanned:])
        self._scanned = len(self.out)
        for _ in range(new.count(b"\x1b[c")):  # DA1: 4 means Sixel
            self.send(b"\x1b[?62;4;22c" if self.kind == "sixel" else b"\x1b[?62;22c")
        for query in re.findall(rb"\x1b_G([^;\x1b]*a=q[^;\x1b]*);", new):
            image_id = re.search(rb"i=(\d+)", query).group(1)
            if self.kind == "kitty":
                self.send(b"\x1b_Gi=" + image_id + b";OK\x1b\\")
        if b"\x1b[>q" in new and self.kind == "kitty":
            self.send(b"\x1bP>|" + self.version.encode() + b"\x1b\\")

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.master], [], [], min(left, 0.05))
            if ready:
                try:
                    chunk = os.read(self.master, 1 << 16)
                except OSError:
                    return
                self.out += chunk
                self._answer()

    def wait_for(self, pattern: bytes, seconds: float, start: int = 0) -> int:
        """Pump until ``pattern`` shows in the output after ``start``; its offset."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            found = self.out.find(pattern, start)
            if found >= 0:
                return found
            self.pump(0.1)
        raise AssertionError(f"no {pattern!r} after {seconds}s; tail: {bytes(self.out[-2000:])!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(b"\x11")  # Ctrl+Q
            self.pump(1.0)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def sends(data: bytes, kind: str) -> int:
    """How many pictures ``data`` sends (Sixel images, or kitty image transmissions' first chunks)."""
    if kind == "sixel":
        return len(SIXEL_START.findall(data))
    return len(set(re.findall(rb"\x1b_G[^;\x1b]*i=(\d+),m=[01],f=100", data)))


def run_app(model: Path, kind: str, tmp: Path, size: str = "64x64", renders: int = 2) -> list[dict]:
    """Start the app on ``model`` in a fake ``kind`` terminal, render ``renders`` times (Enter, then
    ] for seed + 1) and return, per render, the bytes written and the pictures sent in it."""
    width, height = size.split("x")
    env = {**os.environ, "SDTERM_CACHE_DIR": str(tmp / "cache"), "SDTERM_DATA_DIR": str(tmp / "data"),
           "SDTERM_CONFIG_DIR": str(tmp / "config"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    for name in ("TMUX", "KITTY_WINDOW_ID"):
        env.pop(name, None)
    protocol = "auto" if kind != "halfcell" else "halfcell"
    argv = [sys.executable, "-m", "sdterm", "--model", str(model), "--outdir", str(tmp / "out"), "--steps", "2",
            "--width", width, "--height", height, "--image-protocol", protocol, "--device", "cpu"]
    term = FakeTerminal(argv, kind, env)
    results = []
    try:
        term.wait_for(b"no image yet", 90)
        term.pump(1.0)
        term.send(b"a red fox")
        term.wait_for(b"tokens", 90)  # the token line counts the prompt: the model is loaded
        term.pump(1.0)
        for n in range(renders):
            start = len(term.out)
            term.send(b"\r" if n == 0 else b"]")
            term.wait_for(b"saved", 120, start)
            term.pump(2.0)  # whatever follows the render (caption, notices, the stage panel)
            data = bytes(term.out[start:])
            results.append({"bytes": len(data), "sends": sends(data, kind)})
            if n == 0:
                term.send(b"\t")  # to the image view: ] is its key
                term.pump(1.0)
    finally:
        term.close()
    return results


@pytest.mark.skipif(not os.environ.get("SDTERM_PTY_TESTS"), reason="slow, and not yet seen to pass under pytest: "
                    "set SDTERM_PTY_TESTS=1 (the __main__ measurement runs it)")
@pytest.mark.parametrize("kind", ["sixel", "kitty"])
def test_a_render_sends_its_picture_once(demo_model, tmp_path, kind):
    results = run_app(demo_model, kind, tmp_path)
    assert [r["sends"] for r in results] == [1, 1], results


if __name__ == "__main__":
    import tempfile

    model, kind = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "sixel"
    size = sys.argv[3] if len(sys.argv) > 3 else "512x512"
    with tempfile.TemporaryDirectory() as tmp:
        for r in run_app(model, kind, Path(tmp), size):
            print(kind, size, r)
