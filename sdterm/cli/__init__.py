"""The command line: ``sdterm`` (the app) and its subcommands, one module each.

``SUBCOMMANDS`` is the one list of them; each module has ``add_parser(subparsers)`` (its flags,
returning its parser) and ``run(args) -> int``. ``sdterm`` with no COMMAND opens the app
(``app.py``, whose flags are the top-level parser's). Here: the parser built from that list,
``main`` (every failure through :func:`sdterm.errors.report`: one line and an exit code, or an
"internal error" with its traceback behind ``--debug``) and ``entry``, the ``sdterm`` script's and
``python -m sdterm``'s entry point. Nothing else in sdterm imports this package.

The commands: ``app.py``, ``generate.py`` (one prompt or a batch file to PNGs), ``verify.py`` (an
image's request rendered again and compared), ``cache.py`` (the prompt-embedding cache),
``doctor.py`` (what this machine has), ``demo_model.py``; ``sdterm bench`` is ``sdterm/bench/``,
``sdterm download`` ``sdterm/download/`` and ``sdterm show`` ``sdterm/show.py``.
Each imports torch, the engine and the UI inside ``run``, so ``sdterm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
from typing import NoReturn


def _leave() -> None:
    """At exit, after every other exit handler: a command that imported torch ends here with
    ``os._exit``, skipping the interpreter's teardown (freeing the page-locked host copies of the
    models, the CUDA context and every module: 0.45-0.6 s of a 4.3-5.4 s ``sdterm generate`` on an
    H100, 2026-11-27), which the operating system then does at once. By this point Python has
    joined every non-daemon thread (a model cache still being written, the hash memo) and run the
    exit handlers registered after this one (this module registers it before importing anything
    that registers its own), so nothing a command writes is cut short."""
    if _exit_code is None or "torch" not in sys.modules:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(_exit_code)


_exit_code: int | None = None
"""The code :func:`finish` exits with (None: not through it, as after argparse's own exit)."""
atexit.register(_leave)

# Imported after the exit handler is registered (see _leave): what they register runs before it.
from .. import __version__, show
from ..bench import command as bench
from ..download import command as download
from ..errors import EXIT_CANCELLED, EXIT_ERROR, EXIT_INTERNAL, EXIT_USAGE, UserError, debug_enabled, report
from . import app, cache, demo_model, doctor, generate, verify

__all__ = ["EXIT_CANCELLED", "EXIT_ERROR", "EXIT_INTERNAL", "EXIT_USAGE", "SUBCOMMANDS", "UserError", "build_parser",
           "entry", "finish", "main"]

SUBCOMMANDS = (generate, verify, cache, bench, doctor, download, show, demo_model)
"""Every ``sdterm COMMAND``, in the order ``sdterm --help`` lists them."""

DEBUG_HELP = "print the traceback of a failure, for a bug report (also: SDTERM_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each command's ``run`` is its parser's default for ``args.run``."""
    parser = argparse.ArgumentParser(
        prog="sdterm",
        description="Stable Diffusion v1 text-to-image for small GPUs, in the terminal.",
        # No prefix matching: the app's render flags (--hires-steps, --init-image...) would make a
        # command's own shorter flag (bench --hires, --init) ambiguous at the top level.
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sdterm {__version__}")
    app.add_arguments(parser)  # with no COMMAND, the app: sdterm --model PATH [--outdir DIR] [render options]
    parser.set_defaults(run=app.run)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub).set_defaults(run=command.run)
    parser.commands = sub.choices  # each command's own parser, for its own usage in errors

    # --debug before or after the command: every subcommand takes it too. SUPPRESS keeps a
    # subcommand's parser from resetting a --debug given before the command to False.
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _debug_in(argv: list[str]) -> bool:
    """``--debug`` among the options (before a ``--``), for failures before the parser has run."""
    return "--debug" in (argv[: argv.index("--")] if "--" in argv else argv)


def main(argv: list[str] | None = None) -> int:
    """Run sdterm; returns the exit code (see :mod:`sdterm.errors`).

    Known failures (sdterm's own errors, out of memory, file errors, Ctrl+C) end in one line; any
    other exception is a bug and ends in an "internal error" line, with the traceback on stderr
    when ``--debug`` is given or ``SDTERM_DEBUG=1`` is set.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = debug_enabled(_debug_in(argv))
    try:
        parser = build_parser()
        args, extras = parser.parse_known_args(argv)
        if extras:  # argparse would blame the top-level parser and print its usage, not the command's
            owner = parser.commands.get(args.command, parser) if args.command else parser
            owner.error("unrecognized arguments: " + " ".join(extras))
        debug = debug_enabled(args.debug)
        _quiet_libraries()
        return args.run(args)
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit (argparse's usage errors) goes through
        return report(exc, debug=debug, stream=sys.stderr)


def finish(code: int) -> NoReturn:
    """Exit with ``code`` as the ``sdterm`` script does: through :func:`_leave`."""
    global _exit_code
    _exit_code = code
    sys.exit(code)


def entry() -> None:
    finish(main())
