"""How an ``sdterm`` command process ends (cli/__init__.py's ``_leave``): a command that imported
torch leaves with its exit code right after the exit handlers, skipping the interpreter's teardown;
its output is complete, and handlers registered while it ran (a model cache published at exit) run
first. Each case is a fresh interpreter: the exit itself is what is tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sdterm.errors import EXIT_ERROR

SCRIPT = """
import atexit, sys
log = sys.argv[1]

class Late:
    def __del__(self, open=open, log=log):  # the interpreter's teardown, if there is one (builtins go first)
        with open(log, "a") as f:
            f.write("teardown\\n")

import sdterm.cli
if sys.argv[2] == "torch":
    import torch
keep = Late()
atexit.register(lambda: open(log, "a").write("handler\\n"))  # registered while the command runs
sys.argv = ["sdterm"] + sys.argv[3:]
sdterm.cli.entry()
"""


def _run(tmp_path: Path, torch: bool, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "exit.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "torch" if torch else "-", *args],
                          capture_output=True, text=True, timeout=300)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_a_render_ends_without_the_teardown_and_its_output_is_whole(tmp_path, demo_model):
    out = tmp_path / "out"
    proc, log = _run(tmp_path, False, "generate", "a red fox", "--model", str(demo_model), "--steps", "2",
                     "-W", "64", "-H", "64", "--seed", "3", "--json", "--outdir", str(out), "--no-history")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # flushed before the exit
    assert Path(result["path"]).is_file() and Path(result["path"]).parent == out
    assert log == ["handler"]


def test_the_exit_code_is_kept(tmp_path):
    proc, log = _run(tmp_path, True, "generate", "a fox", "--model", str(tmp_path / "missing.safetensors"))
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert proc.stderr.startswith("sdterm: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert log == ["handler"]


def test_a_command_without_torch_ends_as_python_ends(tmp_path):
    """No torch, nothing slow to tear down: the usual exit, teardown included."""
    proc, log = _run(tmp_path, False, "cache", "stats")
    assert proc.returncode == 0, proc.stderr
    assert log == ["handler", "teardown"]


def test_the_cold_bench_child_exits_as_the_script_does(tmp_path, demo_model, monkeypatch):
    """``bench --cold`` times ``sdterm generate`` through bench/cold_child.py: it must leave the way
    the ``sdterm`` script leaves, or its exit column times a teardown users never wait for."""
    import os

    site = tmp_path / "site"
    site.mkdir()
    log = tmp_path / "exit.log"
    (site / "sitecustomize.py").write_text(
        "class _Late:\n"
        f"    def __del__(self, open=open, log={str(log)!r}):\n"
        "        with open(log, 'a') as f:\n"
        "            f.write('teardown\\n')\n"
        "_keep = _Late()\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    result = tmp_path / "child.json"
    proc = subprocess.run([sys.executable, "-m", "sdterm.bench.cold_child", str(result), "generate", "a fox",
                           "--model", str(demo_model), "--steps", "1", "-W", "64", "-H", "64",
                           "--outdir", str(tmp_path / "out"), "--no-history"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(result.read_text())["code"] == 0
    assert not log.exists()
    # the probe works: without torch, the same child ends with the teardown
    proc = subprocess.run([sys.executable, "-m", "sdterm.bench.cold_child", str(result), "cache", "stats"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == ["teardown"]
