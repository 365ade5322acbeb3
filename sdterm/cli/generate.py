"""``sdterm generate``: one prompt, or one per line of a ``--from-file`` batch, to PNGs through the
render service; the engine's events as short lines on stderr, the paths (or ``--json``) on stdout."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

from ..errors import EXIT_ERROR, ConfigError, UserError
from ..options import add_render_options, params_from_args, whole_number
from ..params import MAX_BATCH, MAX_SEED, Params, batch
from ..resolve import user_config
from ..units import format_bytes
from .engine_setup import (add_addon_options, add_embeddings_option, add_graphs_option, add_threads_option,
                           make_engine, start_device, start_driver, with_loras)


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``sdterm generate`` on ``parser.add_subparsers(...)``; returns its parser."""
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
    gen.add_argument("-n", "--batch-count", metavar="N", type=whole_number, default=1,
                     help=f"N images in a row, seeds SEED, SEED+1, ... (1..{MAX_BATCH}; each line of --from-file N times)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per image with the path, seed, per-stage figures, and the "
                          "prompts' chunks and embeddings")
    gen.add_argument("--progress", choices=("auto", "json", "none"), default="auto",
                     help="how the render reports itself as it goes: auto (step and stage lines on stderr), "
                          "json (one JSON object a line on stdout: step, stage, notice, preview, then the "
                          "result), none")
    gen.add_argument("--preview", metavar="FILE.png",
                     help="write the live preview (the picture as it forms, every half second) over FILE.png")
    gen.add_argument("--history", action=argparse.BooleanOptionalAction, default=None,
                     help="record each image in the history, as the app does (default: defaults.history "
                          "in sdterm.yaml, else yes)")
    gen.add_argument("--no-cache", action="store_true", help="don't read or write the prompt-embedding cache")
    add_embeddings_option(gen)
    add_addon_options(gen)
    add_threads_option(gen)
    add_graphs_option(gen)
    return gen


def stage_line(s) -> str:
    from ..engine.events import STAGE_TITLES

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
        from ..engine.events import Notice, StageFinished, StepDone

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


def _params_from(args: argparse.Namespace) -> Params:
    """The validated parameters of a ``generate`` job; a random seed when ``--seed`` is left out."""
    seed = args.seed if args.seed is not None else secrets.randbelow(MAX_SEED + 1)
    params = params_from_args(args)
    return params.replace(seed=seed, prompt=with_loras(params.prompt, getattr(args, "lora", None))).validated()


class _LineParser(argparse.ArgumentParser):
    """The parser of one ``--from-file`` line: every error (an unknown flag included, which
    ``exit_on_error=False`` does not cover) raises ``ValueError`` instead of exiting."""

    def error(self, message: str):
        raise ValueError(message)


def _batch_jobs(path: str, base: argparse.Namespace) -> list[tuple[str, argparse.Namespace | str]]:
    """One job per non-empty, non-comment line of ``path``: (where, namespace) or (where, error)."""
    import shlex

    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc})") from None
    line_parser = _LineParser(prog="line", add_help=False, exit_on_error=False)
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


def run(args: argparse.Namespace) -> int:
    """``sdterm generate``: exit 1 when a line of a batch failed (the others still render)."""
    if (args.prompt is None) == (args.from_file is None):  # before torch is imported: answered at once
        raise UserError("give a PROMPT or --from-file FILE (one of them)")
    from ..resolve import apply_defaults, demo_model_dir, random_weights_source, resolve_model

    demo = getattr(args, "demo", False)
    if demo and (args.model or args.random_weights):
        raise UserError("--demo renders the demo model: leave out --model and --random-weights")
    cfg = user_config()
    apply_defaults(args, cfg, demo=demo)
    jobs = _batch_jobs(args.from_file, args) if args.from_file else [("", args)]
    if not 1 <= args.batch_count <= MAX_BATCH:  # bad values are reported before torch is imported
        raise UserError(f"-n/--batch-count must be between 1 and {MAX_BATCH}, got {args.batch_count}")
    if not args.from_file:
        _params_from(args)
    if args.preview:  # a path that can't take the preview: one line before any work
        from .progress import PreviewFile

        PreviewFile.checked(Path(args.preview).expanduser())
    from .. import paths

    model = None if args.random_weights else str(demo_model_dir()) if demo else resolve_model(args.model, cfg)
    start_driver(args)  # the driver and the device's context beside torch's import
    if model is not None:
        from ..engine.loading.hasher import begin

        begin(model, paths.hash_memo_file())  # the file's sha256 read beside torch's import, not after it
    start_device(args)  # imports torch
    from ..engine.pipeline import open_model
    from ..engine.prompt.tokenizer import PromptError
    from ..history import History, history_file
    from ..service import RenderService

    if model is None:
        source = random_weights_source(args.config)
    else:
        source = open_model(model, config_path=args.config, data_dir=paths.data_dir())
    engine = make_engine(source, args)
    engine.keep_text = bool(args.from_file)  # one prompt: once encoded, its renders find it in the cache
    thread = render_thread(engine, jobs)
    outdir = Path(args.outdir).expanduser() if args.outdir else paths.default_outdir()
    history = History(history_file()) if args.history else None
    if history is not None and history.repaired:
        print(f"note: history: moved {history.repaired} unreadable line(s) to {history.quarantine}", file=sys.stderr)
    service = RenderService(engine, outdir, history, thread=thread)
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
                more = f" (to {batch(params, args.batch_count)[-1].seed})" if args.batch_count > 1 else ""
                print(f"{prefix}seed {params.seed}{more}", file=sys.stderr)
            for one in batch(params, args.batch_count):  # A1111's batch count: seed, seed+1, ...
                _render_one(service, one, args.json, args)
        except (ConfigError, PromptError) as exc:
            if not args.from_file:
                raise
            print(f"sdterm: error: {prefix}{exc}", file=sys.stderr)
            failed += 1
    return EXIT_ERROR if failed else 0


def render_thread(engine, jobs: list):
    """On a GPU, the thread the renders run on (``engine/render_thread.py``), its first job
    started at once: the engine's head start on the first render (``Engine.warm_for``: the U-Net's
    read, the first calls' plans and kernels, the resident models uploaded, the U-Net's graph
    captured) while this thread still prepares. None on the CPU."""
    if engine.device.type != "cuda":
        return None
    from ..engine.render_thread import RenderThread

    thread = RenderThread()
    first = next((job for _, job in jobs if not isinstance(job, str)), None)
    if first is not None:
        try:
            params = _params_from(first)
        except (ConfigError, UserError):
            params = None  # reported when the job's turn comes
        if params is not None:
            thread.submit(engine.warm_for, params)
    return thread


def _render_one(service, params: Params, as_json: bool, args=None) -> None:
    """Render, save and record one image (the render service), and say where it went."""
    from ..service import SaveError
    from .progress import PREVIEW_INTERVAL, JsonProgress, PreviewFile, fan_out

    engine = service.engine
    mode = getattr(args, "progress", "auto")
    as_json = as_json or mode == "json"
    reporter = JsonProgress() if mode == "json" else StderrProgress(quiet=as_json or mode == "none")
    preview = PreviewFile.checked(Path(args.preview).expanduser()) if getattr(args, "preview", None) else None
    result = service.render(params, emit=fan_out(reporter, preview),
                            preview=PREVIEW_INTERVAL if preview is not None else None)
    if preview is not None and preview.error is not None:
        print(f"note: --preview {preview.path} not written ({preview.error.strerror or preview.error})", file=sys.stderr)
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
            "prepare_seconds": round(result.prepare_seconds, 4),
            "model": result.model_name,
            "model_hash": result.model_hash,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "plan": result.plan,
            "vram_budget": engine.budget,
            "demo": result.demo,
            "request": params.to_dict(),
            "image_size": list(result.image.size),  # the hires fix's final size; the request has the first pass's
            "cache": result.stages[0].cache_texts,
            "prompts": result.prompts,
            "infotext_extra": result.infotext_extra,
            "loras": getattr(result, "loras", []),
            "stages": [s.to_dict() for s in result.stages],
            "notices": result.notices + ([demo_note] if result.demo else []),
        }
        if mode == "json":
            out = {"event": "result", **out}
        print(json.dumps(out), flush=True)
    else:
        if result.demo:
            print(f"note: {demo_note}", file=sys.stderr)
        print(path, flush=True)
