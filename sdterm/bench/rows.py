"""What ``sdterm bench`` measured: one ``Row`` per size x budget (sdterm) or size x mode (diffusers),
the whole ``BenchReport``, and each row's speed against diffusers all on the GPU."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from .options import BenchOptions


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
    ratio_compiled: float | None = None
    """s/render over diffusers + torch.compile's s/render at the same size."""
    first_seconds: float | None = None
    """diffusers: the warm-up render's seconds (with torch.compile: the compile's cost)."""
    error: str | None = None
    notices: list[str] = field(default_factory=list)
    """sdterm: the engine's notices during the timed renders (e.g. an out-of-memory retry);
    diffusers: what the reader should know beside the plan (torch.compile's first render)."""
    image: Any = field(default=None, repr=False)
    """The last timed render's image (PIL); not part of the JSON."""
    target: tuple[int, int] | None = None
    """A hires-fix row: the final (width, height); width x height is the first pass's."""

    @property
    def size(self) -> str:
        base = f"{self.width}x{self.height}"
        return f"{base}->{self.target[0]}x{self.target[1]}" if self.target else base

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
            "target": list(self.target) if self.target else None,
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
            "ratio_to_diffusers_compile": r(self.ratio_compiled),
            "first_render_seconds": r(self.first_seconds),
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
            "sampler": o.sampler,
            "schedule": o.schedule,
            "model_calls": o.model_calls,
            "kind": o.kind,
            "init_strength": o.init_strength,
            "hires": {"scale": o.hires_scale, "steps": o.hires_steps, "strength": o.hires_strength,
                      "upscaler": o.hires_upscaler} if o.hires_scale else None,
            "cfg": o.cfg,
            "repeats": o.repeats,
            "seed": o.seed,
            "prompt": o.prompt,
            "sizes": [f"{w}x{h}" for w, h in o.sizes],
            "budgets": [b.bytes for b in o.budgets],
            "reference_modes": list(o.reference_modes),
            "timing": {
                "seconds_per_render": "median over the timed renders, each from request to image (synchronized)",
                "sdterm_seconds_per_step": "U-Net stage run seconds / steps (its upload is load time, not run time); "
                "a step of a second-order sampler is two model calls (model_calls: the render's)",
                "diffusers_seconds_per_step": "end of the first step to end of the last / (steps - 1)",
                "peaks": "max over the timed renders; sdterm per stage (counters reset at each stage), "
                "diffusers over the whole render",
            },
            "rows": [row.to_dict() for row in self.rows],
            "notes": self.notes,
        }


def add_ratios(rows: list[Row]) -> None:
    """Each row's s/render over diffusers all-on-GPU's (eager) and over diffusers + torch.compile's
    at the same size (None without that row)."""
    def base(mode: str) -> dict:
        return {(r.width, r.height): r.seconds_per_render for r in rows
                if r.who == "diffusers" and r.mode == mode and r.seconds_per_render}

    eager, compiled = base("gpu"), base("compile")
    for r in rows:
        s = r.seconds_per_render
        b, c = eager.get((r.width, r.height)), compiled.get((r.width, r.height))
        r.ratio = s / b if (b and s is not None) else None
        r.ratio_compiled = s / c if (c and s is not None) else None
