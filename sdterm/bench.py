"""``sdterm bench``: device memory and speed of sdterm's renders beside diffusers' pipeline, same weights.

One run measures, for each requested size x VRAM budget, sdterm's renders with the prompt cached and
the models already in host memory (one warm-up render first, then ``--repeats`` timed ones), and then,
when diffusers is installed, diffusers' ``StableDiffusionPipeline`` built on the very same weights
(all on the GPU, model CPU offload, sequential CPU offload). It prints one table, or with ``--json``
one JSON object with raw bytes and seconds.

Like ``cli.py`` this is a front end: it drives the engine and prints; the engine itself never prints.
sdterm runs first, so diffusers' allocations can't reach sdterm's figures; each reference pipeline
is freed (and the allocator emptied, peaks reset) before the next one is built.

This module is the command: options, sdterm's rows, ratios, the table and JSON. The diffusers side
(building its pipeline on the engine's weights, and running and timing it) is ``reference.py``.
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
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError, UserError
from .options import number, whole_number
from .params import Params
from .units import format_bytes, parse_size, parse_wh

REFERENCE_MODES = ("gpu", "model-offload", "sequential-offload")
"""diffusers' three ways to place the pipeline: all on the device, one model at a time, layer by layer."""

DEFAULT_PROMPT = "a photo of a red fox in the snow, highly detailed"
DEFAULT_SIZES = "512x512"
DEFAULT_BUDGETS = "1G,2G,none"

Log = Callable[[str], None]


def no_log(_line: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    label: str
    """As the user wrote it ('1G'), or 'none'."""
    bytes: int | None
    """None: no budget."""


@dataclass(frozen=True)
class BenchOptions:
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    """(width, height) pairs."""
    budgets: tuple[Budget, ...] = (Budget("none", None),)
    steps: int = 20
    cfg: float = 7.5
    repeats: int = 2
    """Timed renders per row (after one warm-up)."""
    reference_modes: tuple[str, ...] = REFERENCE_MODES
    """Empty: no diffusers reference."""
    prompt: str = DEFAULT_PROMPT
    negative: str = ""
    seed: int = 1

    def request(self, width: int, height: int) -> Params:
        return Params(
            prompt=self.prompt, negative=self.negative, seed=self.seed, steps=self.steps, cfg=self.cfg,
            width=width, height=height,
        ).validated()


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
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class StagePeak:
    """One sdterm stage over the timed renders: peaks are the max, seconds the median."""

    stage: str
    peak_allocated: int | None
    peak_reserved: int | None
    run_seconds: float
    load_seconds: float
    cache: str | None = None

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "peak_allocated": self.peak_allocated,
            "peak_reserved": self.peak_reserved,
            "run_seconds": round(self.run_seconds, 6),
            "load_seconds": round(self.load_seconds, 6),
            "cache": self.cache,
        }


@dataclass
class Row:
    who: str
    """'sdterm' or 'diffusers'."""
    width: int
    height: int
    label: str
    """sdterm: the budget as written ('1G', 'none'); diffusers: the mode ('gpu', ...)."""
    budget: int | None = None
    mode: str | None = None
    plan: str = ""
    seconds: list[float] = field(default_factory=list)
    """Each timed render, whole (text, denoise and decode)."""
    step_seconds: list[float] = field(default_factory=list)
    """Each timed render's seconds per denoising step."""
    peak_allocated: int | None = None
    """Peak bytes allocated on the device (max over stages and repeats); None on the CPU."""
    peak_reserved: int | None = None
    stages: list[StagePeak] = field(default_factory=list)
    ratio: float | None = None
    """s/render over diffusers all-on-GPU s/render at the same size."""
    error: str | None = None
    notices: list[str] = field(default_factory=list)
    """sdterm: the engine's notices during the timed renders (e.g. an out-of-memory retry)."""
    image: Any = field(default=None, repr=False)
    """The last timed render's image (PIL); not part of the JSON."""

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seconds_per_render(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def seconds_per_step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    def to_dict(self) -> dict:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "size": self.size,
            "width": self.width,
            "height": self.height,
            "who": self.who,
            "label": self.label,
            "budget": self.budget,
            "mode": self.mode,
            "plan": self.plan,
            "peak_allocated": self.peak_allocated,
            "peak_reserved": self.peak_reserved,
            "seconds_per_render": r(self.seconds_per_render),
            "seconds_per_step": r(self.seconds_per_step),
            "seconds": [r(s) for s in self.seconds],
            "ratio_to_diffusers_gpu": r(self.ratio),
            "stages": [s.to_dict() for s in self.stages],
            "error": self.error,
            "notices": self.notices,
        }


@dataclass
class BenchReport:
    card: str
    device: str
    dtype: str
    torch_version: str
    diffusers_version: str | None
    date: str
    model: str
    demo: bool
    options: BenchOptions
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        o = self.options
        return {
            "card": self.card,
            "device": self.device,
            "dtype": self.dtype,
            "torch": self.torch_version,
            "diffusers": self.diffusers_version,
            "date": self.date,
            "model": self.model,
            "demo": self.demo,
            "steps": o.steps,
            "cfg": o.cfg,
            "repeats": o.repeats,
            "seed": o.seed,
            "prompt": o.prompt,
            "sizes": [f"{w}x{h}" for w, h in o.sizes],
            "budgets": [b.bytes for b in o.budgets],
            "reference_modes": list(o.reference_modes),
            "timing": {
                "seconds_per_render": "median over the timed renders, each from request to image (synchronized)",
                "sdterm_seconds_per_step": "U-Net stage run seconds / steps (its upload is load time, not run time)",
                "diffusers_seconds_per_step": "end of the first step to end of the last / (steps - 1)",
                "peaks": "max over the timed renders; sdterm per stage (counters reset at each stage), "
                "diffusers over the whole render",
            },
            "rows": [row.to_dict() for row in self.rows],
            "notes": self.notes,
        }


def add_ratios(rows: list[Row]) -> None:
    """Each row's s/render over diffusers all-on-GPU's at the same size (None without that row)."""
    base = {
        (r.width, r.height): r.seconds_per_render
        for r in rows
        if r.who == "diffusers" and r.mode == "gpu" and r.seconds_per_render
    }
    for r in rows:
        b = base.get((r.width, r.height))
        r.ratio = r.seconds_per_render / b if (b and r.seconds_per_render is not None) else None


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def sync_device(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clean_device(device) -> None:
    """Drop garbage and cached device blocks, and reset the peak counters."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def budget_errors() -> tuple[type[BaseException], ...]:
    """Errors that end one row, not the run: out of memory, and a budget too small for any plan."""
    import torch

    errors: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    try:  # the VRAM budget's errors, where the engine has them
        from .engine.planner import BudgetTooSmall

        errors.append(BudgetTooSmall)
    except ImportError:
        pass
    from .engine import pipeline

    if isinstance(getattr(pipeline, "OutOfMemory", None), type):
        errors.append(pipeline.OutOfMemory)
    return tuple(errors)


def error_line(exc: BaseException) -> str:
    import torch

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ("out of memory: " + first) if isinstance(exc, torch.cuda.OutOfMemoryError) else first


def supports_budget(engine) -> bool:
    return hasattr(engine, "set_budget")


def release_device(engine) -> None:
    """Send every model the engine keeps on the device (resident plans) back to the host."""
    placement = getattr(engine, "placement", None)
    if hasattr(placement, "offload_all"):
        placement.offload_all()
    clean_device(engine.device)


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
    from .reference import bench_reference, reference_modes_to_run  # it builds on this module's rows

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
# Output
# --------------------------------------------------------------------------------------------


def _fmt_seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_report(report: BenchReport) -> str:
    o = report.options
    lines = [
        f"sdterm bench  {report.card}  torch {report.torch_version}"
        + (f"  diffusers {report.diffusers_version}" if report.diffusers_version else "")
        + f"  {report.date}",
        f"model {report.model}, {report.dtype} on {report.device}, {o.steps} steps, cfg {o.cfg:g}, "
        f"{o.repeats} timed render(s) after a warm-up (median; peaks are the max), prompt cached",
        "",
    ]
    head = ("size", "run", "peak alloc", "peak resvd", "s/render", "s/step", "vs gpu", "plan")
    table = []
    for r in report.rows:
        run = f"sdterm {r.label}" if r.who == "sdterm" else f"diffusers {r.label}"
        if r.error:
            table.append((r.size, run, "-", "-", "-", "-", "-", f"error: {r.error}"))
            continue
        table.append((
            r.size,
            run,
            format_bytes(r.peak_allocated),
            format_bytes(r.peak_reserved),
            _fmt_seconds(r.seconds_per_render),
            _fmt_seconds(r.seconds_per_step),
            _fmt_ratio(r.ratio),
            r.plan or "-",
        ))
    widths = [max(len(str(x[i])) for x in [head, *table]) for i in range(len(head))]
    right = {2, 3, 4, 5, 6}

    def fmt(cols) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths))]
        return "  ".join(cells).rstrip()

    lines.append(fmt(head))
    lines.extend(fmt(t) for t in table)
    staged = [r for r in report.rows if r.who == "sdterm" and r.stages]
    if staged:
        from .engine.events import STAGE_TITLES

        lines += ["", "sdterm per stage: peak allocated / reserved, run seconds (median)"]
        for r in staged:
            parts = []
            for s in r.stages:
                mem = (
                    f"{format_bytes(s.peak_allocated)} / {format_bytes(s.peak_reserved)}"
                    if s.peak_allocated is not None
                    else "-"
                )
                extra = f", cache {s.cache}" if s.cache else ""
                parts.append(f"{STAGE_TITLES.get(s.stage, s.stage)} {mem}, {s.run_seconds:.3f}s{extra}")
            lines.append(f"  {r.size} {r.label}: " + "; ".join(parts))
            lines.extend(f"    engine: {n}" for n in r.notices)
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


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
    "REFERENCE_MODES",
    "BenchOptions",
    "BenchReport",
    "Budget",
    "Row",
    "add_parser",
    "add_ratios",
    "bench_sdterm",
    "cmd_bench",
    "format_report",
    "parse_budgets",
    "parse_modes",
    "parse_sizes",
    "run_bench",
]
