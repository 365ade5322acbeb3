"""The real app in a real terminal: tests/smoke_tmux.sh runs ``python -m sdterm`` in tmux on the
demo model, renders twice from the keyboard (a prompt with ``[/snow]`` in it) and quits, then starts it
again and recalls that prompt with Ctrl+R. Skipped where tmux is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("smoke_tmux.sh")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_the_app_renders_twice_and_quits_in_tmux(demo_model, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(demo_model), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smoke: ok" in proc.stdout and "recalled a bracketed prompt" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and all(n.endswith(".png") for n in names), names
    first, second = (int(n.split("-")[1].removesuffix(".png")) for n in names)
    assert second == (first + 1) % 2**32  # ] is seed + 1
