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
from .engine_setup import (add_addon_options, add_embeddings_option, add_graphs_option, add_threads_option,
                           make_engine, start_device, start_driver, with_loras)


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
        help="use the tiny demo model (random weights: images are noise; no GPU needed): the app, or "
        "`sdterm --demo generate PROMPT`",
    )
    parser.add_argument("--no-cache", action="store_true", help="don't read or write the prompt-embedding cache")
    add_embeddings_option(parser)
    add_addon_options(parser)
    add_threads_option(parser)
    add_graphs_option(parser)


def app_session(args: argparse.Namespace, cfg, params, history, budget: int | None):
    """The app's session: the starting parameters, the seed locked when ``--seed`` was given, the
    budget, and sdterm.yaml's ``draft:`` settings for draft mode."""
    from ..session import Session

    return Session(params, history, seed_locked=args.seed is not None, budget=budget, draft=cfg.draft)


def run(args: argparse.Namespace) -> int:
    """The interactive app (the default command); it needs a terminal on stdin and stdout. The
    screen comes up at once; the model loads behind it (:class:`AppModels`)."""
    require_terminal()
    from .. import paths
    from ..history import History, history_file

    cfg, model, params, budget = app_start(args)
    start_driver(args)  # beside the screen's start and torch's import
    history = History(history_file())
    session = app_session(args, cfg, params, history, budget)
    outdir = Path(args.outdir).expanduser() if args.outdir else paths.default_outdir()
    models = AppModels(args, model, outdir, history, warm=params)
    from ..ui.app import SdtermApp
    from ..ui.terminal import prepare_graphics

    protocol = prepare_graphics(args.image_protocol)  # the terminal's answers must come before Textual starts

    app = SdtermApp(None, session, load=models.load, model_names=models.names, image_protocol=protocol,
                    debug=debug_enabled(args.debug))
    app.run()
    return app_exit_code(app)


def app_start(args: argparse.Namespace):
    """What the app starts from, its flags checked (a :class:`UserError` for a bad one, before the
    screen opens): sdterm.yaml, the model's path, the starting parameters (a random seed unless
    ``--seed``) and the VRAM budget. ``sdterm bench --cold`` starts its app process from it too."""
    from ..resolve import apply_defaults, demo_model_dir, resolve_model
    from ..units import parse_budget

    cfg = user_config()
    apply_defaults(args, cfg, demo=args.demo)
    model = str(demo_model_dir()) if args.demo else resolve_model(args.model, cfg)
    budget = parse_budget(args.vram_budget, "--vram-budget")
    if args.device not in ("auto", "cpu"):  # an unusable --device is said before the screen opens
        from ..engine.memory.placement import resolve_device

        try:
            resolve_device(args.device)
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
    seed = args.seed if args.seed is not None else secrets.randbelow(MAX_SEED + 1)
    params = params_from_args(args)
    params = params.replace(seed=seed, prompt=with_loras(params.prompt, args.lora)).validated()
    return cfg, model, params, budget


class AppModels:
    """The app's models: the one it starts on and those ``/model NAME`` switches to (a name in the
    models folder, or a path). :meth:`load` runs on the app's worker thread."""

    def __init__(self, args: argparse.Namespace, model: str, outdir: Path, history, warm=None) -> None:
        self.args = args
        self.model = model
        self.outdir = outdir
        self.history = history
        self.warm = warm
        """The parameters the app starts with: on a GPU each loaded model renders a throwaway at
        their size first (``engine/warmup.py``), while the user types; None: no warm-up."""

    def names(self) -> list[str]:
        """The models in the models folder, by name (what ``/model`` completes)."""
        from ..resolve import find_models

        return [p.name for p in find_models()]

    def path_for(self, name: str) -> str:
        from ..resolve import find_models

        for path in find_models():
            if name in (path.name, path.stem):
                return str(path)
        if Path(name).expanduser().exists():
            return str(Path(name).expanduser())
        listed = ", ".join(self.names()) or "none"
        raise UserError(f"no model {name!r} in the models folder (there: {listed}); give a name from there or a path")

    def load(self, name: str | None, progress):
        """The render service for model ``name`` (None: the one the app started with)."""
        import gc

        from .. import paths
        from ..service import RenderService

        model = self.model if name is None else self.path_for(name)
        gc.collect()  # the previous model's engine, dropped by the app, goes before the next loads
        progress("starting torch")
        start_driver(self.args)  # (once per process: where the app's start did not already)
        from ..engine.pipeline import open_model

        start_device(self.args)
        progress(f"reading {Path(model).name}")
        source = open_model(model, config_path=self.args.config, data_dir=paths.data_dir())
        progress("setting up the engine")
        engine = make_engine(source, self.args)
        if self.warm is not None and engine.device.type == "cuda":
            from ..engine.warmup import warm_up

            progress("warming up the GPU")  # the first render then pays no start-up of its own
            warm_up(engine, self.warm.width, self.warm.height, self.warm.cfg)
        self.model = model
        return RenderService(engine, self.outdir, self.history)


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
