"""What ``sdterm bench`` measures: sizes, VRAM budgets, render settings and diffusers' modes
(``BenchOptions``), read from the command line's flags with one line on the first bad one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, UserError
from ..params import Params
from ..samplers import SAMPLERS, split_sampler
from ..units import parse_size, parse_wh

REFERENCE_MODES = ("gpu", "model-offload", "sequential-offload")
"""diffusers' three ways to place the pipeline: all on the device, one model at a time, layer by layer."""

DEFAULT_PROMPT = "a photo of a red fox in the snow, highly detailed"
DEFAULT_SIZES = "512x512"
DEFAULT_BUDGETS = "1G,2G,none"

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
    sampler: str = "DDIM"
    """A1111's name; the diffusers reference renders with DDIM only (skipped for another sampler)."""
    schedule: str = "Automatic"

    def request(self, width: int, height: int) -> Params:
        return Params(
            prompt=self.prompt, negative=self.negative, seed=self.seed, steps=self.steps, cfg=self.cfg,
            width=width, height=height, sampler=self.sampler, schedule=self.schedule,
        ).validated()

    @property
    def model_calls(self) -> int:
        """U-Net (denoiser) calls of one render: steps, or more for a second-order sampler (Heun,
        DPM2...: two a step but the last) and PLMS (one more on the first step). With CFG each call
        runs the U-Net on the prompt and the negative together (or one after the other)."""
        return SAMPLERS[self.sampler].calls(self.steps)


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


def _sampler_options(args: argparse.Namespace) -> dict:
    """``sampler`` and ``schedule`` from ``--sampler`` (a combined name sets the schedule) and ``--schedule``."""
    split = split_sampler(getattr(args, "sampler", None) or "DDIM")
    if split is None:
        raise UserError(f"--sampler: unknown sampler {args.sampler!r}; one of: {', '.join(SAMPLERS)}")
    schedule = getattr(args, "schedule", None) or split[1] or "Automatic"
    return {"sampler": split[0], "schedule": schedule}


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
        **_sampler_options(args),
    )
    for w, h in opts.sizes:
        opts.request(w, h)  # steps, cfg, seed: ConfigError names the bad one
    return opts
