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
