"""``sdterm bench``: device memory and speed of sdterm's renders beside diffusers' pipeline, same weights.

One run measures, for each requested size x VRAM budget, sdterm's renders with the prompt cached and
the models already in host memory (one warm-up render first, then ``--repeats`` timed ones), and then,
when diffusers is installed, diffusers' ``StableDiffusionPipeline`` built on the very same weights
(all on the GPU, model CPU offload, sequential CPU offload). It prints one table, or with ``--json``
one JSON object with raw bytes and seconds.

Like ``cli.py`` this is a front end: it drives the engine and prints; the engine itself never prints.
sdterm runs first, so diffusers' allocations can't reach sdterm's figures; each reference pipeline
is freed (and the allocator emptied, peaks reset) before the next one is built.

This module is the command: its options, sdterm's rows and the whole run. The records it fills, the
report (ratios, table, JSON) and the device hygiene are ``measure.py``; the diffusers side (building
its pipeline on the engine's weights, and running and timing it) is ``reference.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import tempfile

from .errors import ConfigError, UserError
from .measure import (
    DEFAULT_PROMPT,
    REFERENCE_MODES,
    BenchOptions,
    BenchReport,
    Budget,
    Log,
    Row,
    StagePeak,
    add_ratios,
    budget_errors,
    clean_device,
    error_line,
    format_report,
    no_log,
    release_device,
)
from .options import number, whole_number
from .params import Params
from .reference import bench_reference, reference_modes_to_run
from .units import parse_size, parse_wh

DEFAULT_SIZES = "512x512"
DEFAULT_BUDGETS = "1G,2G,none"


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'512x512,768x512' -> ((512, 512), (768, 512)); each side a positive multiple of 8."""
    out: list[tuple[int, int]] = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            w, h = parse_wh(part, "--sizes")
        except ConfigError as exc:
            raise UserError(str(exc)) from None
        if w <= 0 or h <= 0 or w % 8 or h % 8:
            raise UserError(f"--sizes: {part}: width and height must be positive multiples of 8")
        try:
            Params(width=w, height=h).validated()
        except ConfigError as exc:
            raise UserError(f"--sizes: {part}: {exc}") from None
        if (w, h) not in out:
            out.append((w, h))
    return tuple(out)


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """'1G,2G,none' -> budgets in bytes (sdterm's size syntax), 'none' meaning no budget."""
    out: list[Budget] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part.lower() in ("none", "off"):
            b = Budget("none", None)
        else:
            if not part:
                raise UserError("--budgets: empty entry (use sizes such as 1G or 1536M, or none)")
            try:
                value = parse_size(part, "--budgets")
            except ConfigError as exc:
                raise UserError(f"{exc} (or none)") from None
            if value <= 0:
                raise UserError(f"--budgets: a budget must be more than zero, got {part!r}")
            b = Budget(part, value)
        if b.bytes not in [x.bytes for x in out]:
            out.append(b)
    return tuple(out)


def parse_modes(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part not in REFERENCE_MODES:
            raise UserError(f"--reference-modes: unknown mode {part!r}; use {', '.join(REFERENCE_MODES)}")
        if part not in out:
            out.append(part)
    return tuple(out)


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Validate every option before any work starts (one line on the first bad one)."""
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    opts = BenchOptions(
        sizes=parse_sizes(args.sizes),
        budgets=parse_budgets(args.budgets),
        steps=args.steps,
        cfg=args.cfg,
        repeats=args.repeats,
        reference_modes=() if args.no_reference else parse_modes(args.reference_modes),
        prompt=args.prompt,
        seed=args.seed,
    )
    for w, h in opts.sizes:
        opts.request(w, h)  # steps, cfg, seed: ConfigError names the bad one
    return opts


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def supports_budget(engine) -> bool:
    return hasattr(engine, "set_budget")


def make_engine(source, device: str, cache, budget: int | None, **kwargs):
    """``Engine(...)``, passing ``budget=`` only when there is one (engines before the VRAM budget
    take no such argument)."""
    import inspect

    from .engine.pipeline import Engine

    if budget is not None:
        if "budget" not in inspect.signature(Engine).parameters:
            raise UserError("this sdterm's engine has no VRAM budget yet: use --budgets none")
        kwargs["budget"] = budget
    return Engine(source, device, cache=cache, **kwargs)


def bench_sdterm(engine, opts: BenchOptions, log: Log = no_log) -> list[Row]:
    """One row per size x budget: a warm-up render (fills the embedding cache, builds the models in
    host memory), then ``opts.repeats`` timed renders."""
    rows: list[Row] = []
    soft = budget_errors()
    for w, h in opts.sizes:
        req = opts.request(w, h)
        for budget in opts.budgets:
            row = Row("sdterm", w, h, budget.label, budget=budget.bytes)
            rows.append(row)
            log(f"sdterm {row.size} budget {budget.label}: warm-up + {opts.repeats} timed")
            try:
                if supports_budget(engine):
                    engine.set_budget(budget.bytes)
                elif budget.bytes is not None:
                    raise UserError("this sdterm's engine has no VRAM budget yet: use --budgets none")
                clean_device(engine.device)
                engine.generate(req)  # warm-up
                results = []
                for _ in range(opts.repeats):
                    gc.collect()  # the stage meters reset the peak counters themselves
                    results.append(engine.generate(req))
            except soft as exc:
                row.error = error_line(exc)
                log(f"  {row.error}")
                clean_device(engine.device)
                continue
            _fill_sdterm_row(row, results, opts.steps)
    release_device(engine)
    return rows


def _fill_sdterm_row(row: Row, results: list, steps: int) -> None:
    row.plan = str(getattr(results[-1], "plan", "") or "")
    row.seconds = [r.seconds for r in results]
    by_stage: dict[str, list] = {}
    for r in results:
        for s in r.stages:
            by_stage.setdefault(s.stage, []).append(s)
    for stage, stats in by_stage.items():
        allocs = [s.peak_allocated for s in stats if s.peak_allocated is not None]
        reserved = [s.peak_reserved for s in stats if s.peak_reserved is not None]
        row.stages.append(
            StagePeak(
                stage=stage,
                peak_allocated=max(allocs) if allocs else None,
                peak_reserved=max(reserved) if reserved else None,
                run_seconds=statistics.median(s.run_seconds for s in stats),
                load_seconds=statistics.median(s.load_seconds for s in stats),
                cache=stats[-1].cache,
            )
        )
        if stage == "unet":
            row.step_seconds = [s.run_seconds / steps for s in stats]
    allocs = [s.peak_allocated for s in row.stages if s.peak_allocated is not None]
    reserved = [s.peak_reserved for s in row.stages if s.peak_reserved is not None]
    row.peak_allocated = max(allocs) if allocs else None
    row.peak_reserved = max(reserved) if reserved else None
    row.image = results[-1].image
    row.notices = list(dict.fromkeys(n for r in results for n in getattr(r, "notices", [])))


# ---- the whole run -------------------------------------------------------------------------


def card_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "CPU"
    n = torch.get_num_threads()
    return f"CPU ({cpu}, {n} thread{'s' if n != 1 else ''})"


def run_bench(source, device: str, opts: BenchOptions, *, log: Log = no_log, **engine_kwargs) -> BenchReport:
    """The whole measurement: sdterm's rows, then the reference's, ratios filled in.

    ``source`` is a ``ModelSource``; ``engine_kwargs`` go to ``Engine`` (data_dir, hash_memo).
    Each row keeps its last image (``Row.image``) so a caller can compare sdterm with diffusers.
    """
    import torch

    from .engine.embedding_cache import EmbeddingCache
    from .engine.placement import resolve_device

    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    try:
        import diffusers

        diffusers_version: str | None = diffusers.__version__
    except ImportError:
        diffusers_version = None

    with tempfile.TemporaryDirectory(prefix="sdterm-bench-") as tmp:
        from pathlib import Path

        engine = make_engine(source, device, EmbeddingCache(Path(tmp)), opts.budgets[0].bytes, **engine_kwargs)
        if not supports_budget(engine) and any(b.bytes is not None for b in opts.budgets):
            raise UserError("this sdterm's engine has no VRAM budget yet: use --budgets none")
        engine.tokenizer  # a missing tokenizer is reported before any work starts
        report = BenchReport(
            card=card_name(dev),
            device=str(dev),
            dtype=str(engine.dtype).removeprefix("torch."),
            torch_version=torch.__version__,
            diffusers_version=diffusers_version,
            date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            model=source.name,
            demo=source.demo,
            options=opts,
        )
        report.rows.extend(bench_sdterm(engine, opts, log))
        modes = reference_modes_to_run(opts, dev, report.notes)
        report.rows.extend(bench_reference(engine, opts, modes, log))
        del engine
        clean_device(dev)
    add_ratios(report.rows)
    if report.demo:
        report.notes.append("random or demo weights: timings and memory are real, the images are noise")
    return report


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sdterm bench`` on ``parser.add_subparsers(...)``; returns its parser."""
    p = subparsers.add_parser(
        "bench",
        help="measure memory and speed per size x VRAM budget, beside diffusers on the same weights",
        description=(
            "Renders each size x budget (prompt cached, models already in host memory) and prints peak "
            "device memory per stage, seconds per render and per step, and the plan chosen, beside "
            "diffusers' StableDiffusionPipeline on the same weights when diffusers is installed."
        ),
    )
    p.add_argument("--model", metavar="PATH",
                   help="SD v1 checkpoint or model folder (default: full-size SD v1 with random weights)")
    p.add_argument("--config", metavar="YAML", help="architecture file (default: configs/sd-v1.yaml)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, metavar="WxH,...",
                   help=f"image sizes, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, metavar="SIZE,...",
                   help=f"VRAM budgets such as 1G or 1536M; none = no budget (default {DEFAULT_BUDGETS})")
    p.add_argument("--steps", type=whole_number, default=20, help="DDIM steps (default 20)")
    p.add_argument("--cfg", type=number, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--repeats", type=whole_number, default=2, help="timed renders per row after a warm-up (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="the prompt rendered")
    p.add_argument("--seed", type=whole_number, default=1, help="seed of every render (default 1)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers")
    p.add_argument("--reference-modes", default=",".join(REFERENCE_MODES), metavar="MODE,...",
                   help=f"diffusers placements to measure: {', '.join(REFERENCE_MODES)} (default all)")
    p.add_argument("--json", action="store_true", help="print one JSON object (raw bytes and seconds)")
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from . import paths
    from .engine.pipeline import open_model
    from .resolve import random_weights_source

    opts = options_from_args(args)
    if args.model:
        source = open_model(args.model, config_path=args.config, data_dir=paths.data_dir())
        extra = {"data_dir": paths.data_dir(), "hash_memo": paths.cache_dir() / "model-hashes.json"}
    else:
        source = random_weights_source(args.config)
        extra = {}

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    report = run_bench(source, args.device, opts, log=log, **extra)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    return 0


__all__ = [
    "add_parser",
    "bench_sdterm",
    "cmd_bench",
    "parse_budgets",
    "parse_modes",
    "parse_sizes",
    "run_bench",
]
