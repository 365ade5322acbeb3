"""Command line: ``sdterm generate``, ``sdterm demo-model`` (the app and the rest come in their own modules).

Every failure the user can cause ends in one line on stderr and a non-zero exit, never a traceback;
a bug ends in one "internal error" line and its own exit code, and ``--debug`` (or
``SDTERM_DEBUG=1``) prints its traceback. The exit codes are listed in :mod:`sdterm.errors`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from .errors import EXIT_CANCELLED, EXIT_ERROR, EXIT_INTERNAL, EXIT_USAGE, ConfigError, UserError, debug_enabled, report
from .options import add_render_options, params_from_args, whole_number
from .params import MAX_SEED, Params
from .resolve import open_cache, user_config
from .units import format_bytes, parse_budget

__all__ = ["EXIT_CANCELLED", "EXIT_ERROR", "EXIT_INTERNAL", "EXIT_USAGE", "UserError", "build_parser", "main"]

DEBUG_HELP = "print the traceback of a failure, for a bug report (also: SDTERM_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdterm",
        description="Stable Diffusion v1 text-to-image for small GPUs, in the terminal.",
    )
    # With no COMMAND, the app: sdterm --model PATH [--outdir DIR] [render options]
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="render one prompt to a PNG and print its path")
    gen.add_argument("prompt", metavar="PROMPT", nargs="?", help="what to draw (or --from-file)")
    gen.add_argument(
        "--from-file",
        metavar="FILE",
        help="render one prompt per line; a line may carry its own flags (--seed 3 --steps 30 ...)",
    )
    src = gen.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        metavar="PATH",
        help="SD v1 checkpoint (.safetensors/.ckpt) or a model folder (default: from sdterm.yaml or the models folder)",
    )
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="full-size SD v1 with random weights (for memory/speed measurements; images are noise)",
    )
    gen.add_argument("--config", metavar="YAML", help="architecture file (default: configs/sd-v1.yaml)")
    add_render_options(gen)
    gen.add_argument("--outdir", metavar="DIR", help="where to write images (default ./outputs)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the path, seed and per-stage figures")
    gen.add_argument("--no-cache", action="store_true", help="don't read or write the prompt-embedding cache")

    cache = sub.add_parser("cache", help="the prompt-embedding cache: path, stats, clear, prune")
    cache.add_argument("action", choices=("path", "stats", "clear", "prune"))
    cache.add_argument("--json", action="store_true", help="stats as one JSON object")

    from .bench import add_parser as add_bench_parser
    from .doctor import add_parser as add_doctor_parser
    from .download import add_parser as add_download_parser
    from .show import add_parser as add_show_parser

    add_bench_parser(sub)
    add_doctor_parser(sub)
    add_download_parser(sub)
    add_show_parser(sub)

    demo = sub.add_parser("demo-model", help="write a tiny random-weight model of the SD v1 architecture")
    demo.add_argument("dir", metavar="DIR")
    demo.add_argument("--seed", type=whole_number, default=0, help="weight seed (default 0)")

    # --debug before or after the command: every subcommand takes it too. SUPPRESS keeps a
    # subcommand's parser from resetting a --debug given before the command to False.
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


# --------------------------------------------------------------------------------------------


def stage_line(s) -> str:
    from .engine.events import STAGE_TITLES

    head = f"{STAGE_TITLES[s.stage]:<12} load {s.load_seconds:6.2f}s  run {s.run_seconds:6.2f}s"
    if s.peak_allocated is not None:
        mem = f"peak alloc {format_bytes(s.peak_allocated)}, reserved {format_bytes(s.peak_reserved)}"
    else:
        mem = f"host RSS {format_bytes(s.host_rss)}"
    extra = f"  cache {s.cache}" if s.cache else ""
    if s.skipped:
        extra += " (encoder not loaded)"
    return f"{head}  {mem}{extra}"


class StderrProgress:
    """Renders engine events as short lines on stderr (steps only when stderr is a terminal)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def __call__(self, event) -> None:
        from .engine.events import Notice, StageFinished, StepDone

        if isinstance(event, Notice):
            print(f"note: {event.message}", file=sys.stderr)
        elif self.quiet:
            return
        elif isinstance(event, StepDone) and self.tty:
            rate = event.step / event.elapsed if event.elapsed > 0 else 0.0
            end = "\n" if event.step == event.total else ""
            print(f"\r  step {event.step}/{event.total}  {rate:5.2f} it/s", end=end, file=sys.stderr, flush=True)
        elif isinstance(event, StageFinished):
            print("  " + stage_line(event.stats), file=sys.stderr)


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from . import paths
    from .engine.embedding_cache import EmbeddingCache

    settings = user_config().cache
    cache = open_cache() or EmbeddingCache(paths.embedding_cache_dir(settings.dir))
    if args.action == "path":
        print(cache.folder)
        return 0
    try:
        if args.action == "clear":
            print(f"removed {cache.clear()} entries from {cache.folder}")
            return 0
        if args.action == "prune":
            print(f"removed {cache.prune()} entries (unreadable, stale or over the cap) from {cache.folder}")
            return 0
    except OSError as exc:
        raise UserError(f"cannot change {cache.folder} ({exc.strerror or exc})") from None
    st = cache.stats()

    def when(t: float | None) -> str | None:
        return None if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    if args.json:
        print(json.dumps({"path": str(cache.folder), "entries": st.entries, "bytes": st.bytes,
                          "max_bytes": cache.max_bytes, "oldest": when(st.oldest), "newest": when(st.newest)}))
    else:
        print(f"path     {cache.folder}")
        print(f"entries  {st.entries}")
        print(f"size     {format_bytes(st.bytes)} of {format_bytes(cache.max_bytes)}")
        if st.entries:
            print(f"oldest   {when(st.oldest)}")
            print(f"newest   {when(st.newest)}")
    return 0


def make_engine(source, args: argparse.Namespace):
    """The engine for ``source`` with the user's device, cache and budget; a missing tokenizer
    is reported now, before any work starts (or the screen opens)."""
    from . import paths
    from .engine.pipeline import Engine
    from .engine.memory.placement import resolve_device

    try:  # an unusable --device is the user's to fix (the engine says so with a RuntimeError)
        resolve_device(args.device)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    engine = Engine(
        source,
        args.device,
        data_dir=paths.data_dir(),
        hash_memo=paths.cache_dir() / "model-hashes.json",
        cache=open_cache(args.no_cache),
        budget=parse_budget(args.vram_budget, "--vram-budget"),
    )
    engine.models.tokenizer
    return engine


def _params_from(args: argparse.Namespace) -> Params:
    """The validated parameters of a ``generate`` job; a random seed when ``--seed`` is left out."""
    seed = args.seed if args.seed is not None else secrets.randbelow(MAX_SEED + 1)
    return params_from_args(args).replace(seed=seed).validated()


def _batch_jobs(path: str, base: argparse.Namespace) -> list[tuple[str, argparse.Namespace | str]]:
    """One job per non-empty, non-comment line of ``path``: (where, namespace) or (where, error)."""
    import shlex

    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    line_parser = argparse.ArgumentParser(prog="line", add_help=False, exit_on_error=False)
    line_parser.add_argument("words", nargs="*")
    add_render_options(line_parser)
    jobs: list[tuple[str, argparse.Namespace | str]] = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            ns = line_parser.parse_args(shlex.split(line))
        except (ValueError, argparse.ArgumentError) as exc:
            jobs.append((where, str(exc)))
            continue
        job = argparse.Namespace(**vars(base))
        for key, value in vars(ns).items():
            if key != "words" and value is not None and value != line_parser.get_default(key):
                setattr(job, key, value)
        job.prompt = " ".join(ns.words)
        jobs.append((where, job))
    return jobs


def cmd_generate(args: argparse.Namespace) -> int:
    from . import paths
    from .engine.pipeline import open_model
    from .engine.prompt.tokenizer import PromptError
    from .history import History, history_file
    from .resolve import apply_defaults, random_weights_source, resolve_model
    from .service import RenderService

    cfg = user_config()
    apply_defaults(args, cfg)
    if (args.prompt is None) == (args.from_file is None):
        raise UserError("give a PROMPT or --from-file FILE (one of them)")
    jobs = _batch_jobs(args.from_file, args) if args.from_file else [("", args)]
    if not args.from_file:
        _params_from(args)  # bad parameters are reported before the model loads
    if args.random_weights:
        source = random_weights_source(args.config)
    else:
        model = resolve_model(args.model, cfg)
        source = open_model(model, config_path=args.config, data_dir=paths.data_dir())
    engine = make_engine(source, args)
    outdir = Path(args.outdir).expanduser() if args.outdir else paths.default_outdir()
    service = RenderService(engine, outdir, History(history_file()))
    failed = 0
    for where, job in jobs:
        prefix = f"{where}: " if where else ""
        if isinstance(job, str):
            print(f"sdterm: error: {prefix}{job}", file=sys.stderr)
            failed += 1
            continue
        try:
            params = _params_from(job)
            if job.seed is None and not args.json:
                print(f"{prefix}seed {params.seed}", file=sys.stderr)
            _render_one(service, params, args.json)
        except (ConfigError, PromptError) as exc:
            if not args.from_file:
                raise
            print(f"sdterm: error: {prefix}{exc}", file=sys.stderr)
            failed += 1
    return EXIT_ERROR if failed else 0


def _render_one(service, params: Params, as_json: bool) -> None:
    """Render, save and record one image (the render service), and say where it went."""
    from .service import SaveError

    engine = service.engine
    result = service.render(params, emit=StderrProgress(quiet=as_json))
    try:
        path = service.save(params, result)
    except SaveError as exc:
        kept = f"; the image was kept as {exc.kept}" if exc.kept else ""
        raise UserError(f"cannot write to {exc.outdir} ({exc.strerror or exc}){kept}") from None
    try:
        service.record(params, path, result.model_hash)
    except OSError as exc:
        print(f"note: history not written ({exc.strerror or exc}): {service.history.path}", file=sys.stderr)
    demo_note = "demo model (random weights): the image is noise"
    if as_json:
        out = {
            "path": str(path),
            "seed": params.seed,
            "seconds": round(result.seconds, 4),
            "model": result.model_name,
            "model_hash": result.model_hash,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "plan": result.plan,
            "vram_budget": engine.budget,
            "demo": result.demo,
            "request": params.to_dict(),
            "cache": result.stages[0].cache_texts,
            "stages": [s.to_dict() for s in result.stages],
            "notices": result.notices + ([demo_note] if result.demo else []),
        }
        print(json.dumps(out), flush=True)
    else:
        if result.demo:
            print(f"note: {demo_note}", file=sys.stderr)
        print(path, flush=True)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .engine.loading.demo import write_demo_model

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


def cmd_app(args: argparse.Namespace) -> int:
    """The interactive app (the default command)."""
    from . import paths
    from .engine.pipeline import open_model
    from .history import History, history_file
    from .resolve import apply_defaults, demo_model_dir, resolve_model
    from .service import RenderService
    from .session import Session

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
    from .ui.app import SdtermApp
    from .ui.terminal import prepare_graphics

    prepare_graphics()  # textual-image's terminal queries must run before Textual starts

    app = SdtermApp(service, session, image_protocol=args.image_protocol, debug=debug_enabled(args.debug))
    app.run()
    return app_exit_code(app)


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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench as run

    return run(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import cmd_doctor as run

    return run(args)


def cmd_show(args: argparse.Namespace) -> int:
    from .show import run

    return run(args)


def cmd_download(args: argparse.Namespace) -> int:
    from .download import cmd_download as run

    return run(args)


COMMANDS = {"download": cmd_download, "show": cmd_show, "doctor": cmd_doctor, "app": cmd_app, "generate": cmd_generate, "demo-model": cmd_demo_model, "cache": cmd_cache, "bench": cmd_bench}


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
        args = build_parser().parse_args(argv)
        debug = debug_enabled(args.debug)
        _quiet_libraries()
        return COMMANDS[args.command or "app"](args)
    except (Exception, KeyboardInterrupt) as exc:  # SystemExit (argparse's usage errors) goes through
        return report(exc, debug=debug, stream=sys.stderr)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
