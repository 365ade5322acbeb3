"""``sdterm`` with no command: the interactive app. Its flags are the top-level parser's
(``add_arguments``); after it exits, the internal errors it caught are reported (``app_exit_code``)."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from ..errors import EXIT_INTERNAL, UserError, debug_enabled
from ..options import add_render_options, params_from_args
from ..params import MAX_SEED
from ..resolve import user_config
from .engine_setup import add_threads_option, make_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's flags, on ``sdterm``'s own parser: sdterm --model PATH [--outdir DIR] [render options]."""
    parser.add_argument("--model", metavar="PATH", help="SD v1 checkpoint (.safetensors/.ckpt) or a model folder")
    parser.add_argument("--config", metavar="YAML", help="architecture file (default: configs/sd-v1.yaml)")
    add_render_options(parser)
    parser.add_argument("--outdir", metavar="DIR", help="where to write images (default ./outputs)")
    parser.add_argument(
        "--image-protocol",
        choices=("auto", "kitty", "sixel", "halfcell", "unicode"),
        default=None,
        help="how the app draws images (default: detect the terminal)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="open the app on the tiny demo model (random weights: images are noise; no GPU needed)",
    )
    parser.add_argument("--no-cache", action="store_true", help="don't read or write the prompt-embedding cache")
    add_threads_option(parser)


def run(args: argparse.Namespace) -> int:
    """The interactive app (the default command); it needs a terminal on stdin and stdout."""
    require_terminal()
    from .. import paths
    from ..engine.pipeline import open_model
    from ..history import History, history_file
    from ..resolve import apply_defaults, demo_model_dir, resolve_model
    from ..service import RenderService
    from ..session import Session

    cfg = user_config()
    apply_defaults(args, cfg, demo=args.demo)
    model = str(demo_model_dir()) if args.demo else resolve_model(args.model, cfg)
    source = open_model(model, config_path=args.config, data_dir=paths.data_dir())
    engine = make_engine(source, args)
    seed = args.seed if args.seed is not None else secrets.randbelow(MAX_SEED + 1)
    params = params_from_args(args).replace(seed=seed).validated()
    history = History(history_file())
    session = Session(params, history, seed_locked=args.seed is not None, budget=engine.budget)
    outdir = Path(args.outdir).expanduser() if args.outdir else paths.default_outdir()
    service = RenderService(engine, outdir, history)
    from ..ui.app import SdtermApp
    from ..ui.terminal import prepare_graphics

    prepare_graphics()  # textual-image's terminal queries must run before Textual starts

    app = SdtermApp(service, session, image_protocol=args.image_protocol, debug=debug_enabled(args.debug))
    app.run()
    return app_exit_code(app)


NO_TERMINAL = ("the app needs a terminal (stdin or stdout is not a TTY): over SSH use `ssh -t HOST sdterm`; "
               "for scripts and pipes use `sdterm generate`")


def require_terminal(stdin=None, stdout=None) -> None:
    """A :class:`UserError` (one line, exit 1) unless stdin and stdout are terminals: ``ssh host
    sdterm`` without ``-t`` or a pipe would otherwise start Textual on no terminal at all."""
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    for stream in (stdin, stdout):
        try:
            tty = stream is not None and stream.isatty()
        except (AttributeError, ValueError, OSError):
            tty = False
        if not tty:
            raise UserError(NO_TERMINAL)


def app_exit_code(app, stream=None) -> int:
    """After the app: report the internal errors it caught and showed in its notice line, now that
    the terminal is the shell's again (their tracebacks with --debug, else where the error log keeps
    them); the exit code."""
    stream = stream if stream is not None else sys.stderr
    if app.internal_errors:
        if app.print_tracebacks:
            for text in app.internal_errors:
                print(text.rstrip("\n"), file=stream)
            how = "the tracebacks are above"
        elif app.error_log:
            how = f"the tracebacks are in {app.error_log}"
        else:
            how = "run with --debug for the tracebacks"
        print(f"sdterm: internal error: {len(app.internal_errors)} render(s) failed on a bug ({how})", file=stream)
        return EXIT_INTERNAL
    return EXIT_INTERNAL if app.return_code else 0  # Textual printed the traceback of its crash itself
