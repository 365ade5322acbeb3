"""The atomic file helpers: the files they make get the user's umask, and nothing touches the umask.

``os.umask`` can only be read by setting it, and the process umask is shared by every thread: a
library that sets it, even for an instant, can make another thread's file world-writable (or
unreadable). Each check runs in a child process, so this test process's umask is never changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def child(code: str, umask: int = 0o022) -> dict:
    """Run ``code`` in a fresh Python with ``umask`` set and ``os.umask`` spied on from the start;
    ``code`` fills the dict ``out``, which comes back (``umask_calls`` added)."""
    script = (
        "import json, os, sys\n"
        f"os.umask({umask:#o})\n"
        "calls = []\n"
        "real_umask = os.umask\n"
        "def spy(mask):\n"
        "    calls.append(mask)\n"
        "    return real_umask(mask)\n"
        "os.umask = spy\n"
        "out = {}\n"
        f"{code}\n"
        "out['umask_calls'] = calls\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_fsutil_does_not_touch_the_umask():
    out = child("import sdterm.fsutil\nout['loaded'] = 'sdterm.fsutil' in sys.modules")
    assert out["loaded"] and out["umask_calls"] == []


def test_importing_fsutil_again_does_not_touch_the_umask(monkeypatch):
    """The same, in this process: a reload runs the module's top level again under the spy."""
    import importlib
    import os

    import sdterm.fsutil as fsutil

    calls = []

    def spy(mask):
        calls.append(mask)
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", spy)
    importlib.reload(fsutil)
    assert calls == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027], ids=lambda m: f"umask-{m:03o}")
def test_written_files_get_0666_less_the_umask_and_the_umask_is_never_set(umask, tmp_path):
    code = (
        "from pathlib import Path\n"
        "from sdterm.fsutil import atomic_write_bytes, write_temp\n"
        f"folder = Path({str(tmp_path)!r})\n"
        "atomic_write_bytes(folder / 'a.bin', b'x')\n"
        "atomic_write_bytes(folder / 'a.bin', b'yy')  # replacing it: a new file again\n"
        "tmp = write_temp(folder / 'sub', b'z', prefix='.t.')\n"
        "out['modes'] = {p.name: p.stat().st_mode & 0o777 for p in (folder / 'a.bin', tmp)}\n"
        "out['data'] = (folder / 'a.bin').read_text()\n"
        "out['tmp_name'] = tmp.name\n"
        "out['left'] = sorted(p.name for p in folder.iterdir())\n"
    )
    out = child(code, umask)
    want = 0o666 & ~umask
    assert out["modes"] == {"a.bin": want, out["tmp_name"]: want}, {k: oct(v) for k, v in out["modes"].items()}
    assert out["data"] == "yy"
    assert out["tmp_name"].startswith(".t.") and out["tmp_name"].endswith(".tmp")
    assert out["left"] == ["a.bin", "sub"]  # no temporary file left behind
    assert out["umask_calls"] == []


def test_saved_images_get_the_umask_too(tmp_path):
    """The PNG writer goes through the same helpers (temporary file, then an exclusive link)."""
    code = (
        "from pathlib import Path\n"
        "from sdterm.service import publish_png\n"
        f"path = publish_png(b'not really a png', Path({str(tmp_path)!r}) / 'out', 7)\n"
        "out['mode'] = path.stat().st_mode & 0o777\n"
    )
    out = child(code, 0o027)
    assert out["mode"] == 0o640 and out["umask_calls"] == []


def test_temporary_names_never_collide(tmp_path):
    from sdterm.fsutil import write_temp

    made = [write_temp(tmp_path, bytes([i]), prefix=".n.") for i in range(200)]
    assert len(set(made)) == 200
    assert [p.read_bytes() for p in made] == [bytes([i]) for i in range(200)]
