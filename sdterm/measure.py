"""What a benchmark measures and the device hygiene between measurements, shared by sdterm's rows
(``bench.py``) and diffusers' (``reference.py``): the options, one row per size x budget or mode,
the report (as JSON and as the printed table), and the helpers that synchronize, clean and release
the device between runs.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from .params import Params
from .units import format_bytes

REFERENCE_MODES = ("gpu", "model-offload", "sequential-offload")
"""diffusers' three ways to place the pipeline: all on the device, one model at a time, layer by layer."""

DEFAULT_PROMPT = "a photo of a red fox in the snow, highly detailed"
Log = Callable[[str], None]


def no_log(_line: str) -> None:
    pass



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


def release_device(engine) -> None:
    """Send every model the engine keeps on the device (resident plans) back to the host."""
    placement = getattr(engine, "placement", None)
    if hasattr(placement, "offload_all"):
        placement.offload_all()
    clean_device(engine.device)


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
