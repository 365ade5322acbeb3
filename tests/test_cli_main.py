"""The top-level command line (issue 12): --version, the app without a terminal, bare ``cache``,
the short render flags, --threads."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_version_prints_the_version_fast():
    """``sdterm --version``: 'sdterm X.Y.Z', exit 0, without importing torch."""
    import sdterm

    code = (
        "import sys\n"
        "from sdterm.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == [f"sdterm {sdterm.__version__}", "exit 0", "False"], proc.stderr


class _Tty:
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin_tty", [False, True])
def test_app_without_a_terminal_says_so(run_cli, monkeypatch, stdin_tty):
    """``sdterm`` with stdin or stdout not a TTY (ssh without -t, a pipe): one line, exit 1, no Textual.
    Under pytest's capture stdout is not a TTY."""
    import io

    monkeypatch.setattr(sys, "stdin", _Tty() if stdin_tty else io.StringIO(""))
    code, out, err = run_cli("--demo")
    assert code == 1
    assert err.startswith("sdterm: error: the app needs a terminal") and len(err.strip().splitlines()) == 1
    assert "ssh -t" in err and "sdterm generate" in err
    assert out == ""


def test_require_terminal_accepts_two_terminals():
    from sdterm.cli.app import require_terminal

    require_terminal(_Tty(), _Tty())


def test_bare_cache_shows_the_stats(run_cli):
    """``sdterm cache`` with no action is ``sdterm cache stats``."""
    code, out, err = run_cli("cache")
    assert code == 0, err
    assert out == run_cli("cache", "stats")[1]
    assert out.startswith("path ") and "entries" in out
    code, out, err = run_cli("cache", "--json")
    assert code == 0 and '"entries"' in out
