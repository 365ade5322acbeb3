"""``sdterm demo-model DIR``: write the tiny random-weight model of the SD v1 architecture (what
``sdterm --demo`` and the tests run on)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..options import whole_number


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``sdterm demo-model`` on ``parser.add_subparsers(...)``; returns its parser."""
    demo = sub.add_parser("demo-model", help="write a tiny random-weight model of the SD v1 architecture")
    demo.add_argument("dir", metavar="DIR")
    demo.add_argument("--seed", type=whole_number, default=0, help="weight seed (default 0)")
    return demo


def run(args: argparse.Namespace) -> int:
    """``sdterm demo-model DIR``: the folder's path on stdout."""
    from ..engine.loading.demo import write_demo_model

    folder = Path(args.dir).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder")
    try:
        write_demo_model(folder, seed=args.seed)
    except OSError as exc:
        raise UserError(f"cannot write the demo model to {folder} ({exc.strerror or exc})") from None
    print(folder)
    print("demo model: tiny SD v1 architecture with random weights; its images are noise", file=sys.stderr)
    return 0
