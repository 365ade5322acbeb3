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

REFERENCE_MODES = ("gpu", "model-offload", "sequential-offload", "group-offload-block", "group-offload-leaf",
                   "compile")
"""diffusers' ways to run the pipeline: all on the device, one model at a time, layer by layer (accelerate),
one block or one layer at a time prefetched on a CUDA stream (group offload), all on the device with the
U-Net compiled (torch.compile, last: its first render compiles, about a minute on a GPU per size).
All are the default (``all``); those this machine cannot run are skipped with a note."""

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
    init_strength: float | None = None
    """``--init S``: img2img from an init image the bench writes, at denoising strength S."""
    hires_scale: float = 0.0
    """``--hires X``: a hires fix by X of each size (``hires_steps`` more steps, latent upscale)."""
    hires_steps: int = 0
    hires_strength: float = 0.7
    hires_upscaler: str = "Latent"
    preview: bool = False
    """``--preview``: each sdterm row is timed again with a live preview every step, interleaved."""

    def request(self, width: int, height: int, init_image: str = "") -> Params:
        """One render of the run; with ``--init``, from ``init_image`` (a path)."""
        return Params(
            prompt=self.prompt, negative=self.negative, seed=self.seed, steps=self.steps, cfg=self.cfg,
            width=width, height=height, sampler=self.sampler, schedule=self.schedule,
            init_image=init_image if self.init_strength is not None else "",
            strength=self.init_strength if self.init_strength is not None else 0.75,
            hires_scale=self.hires_scale, hires_steps=self.hires_steps, hires_strength=self.hires_strength,
            hires_upscaler=self.hires_upscaler,
        ).validated()

    @property
    def kind(self) -> str:
        """"txt2img", "img2img" or "hires": what each row renders."""
        return "img2img" if self.init_strength is not None else "hires" if self.hires_scale else "txt2img"

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
    """'gpu,compile' -> ("gpu", "compile"), in the order given; 'all' -> every mode."""
    out: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part == "all":
            out.extend(m for m in REFERENCE_MODES if m not in out)
            continue
        if part not in REFERENCE_MODES:
            raise UserError(f"--reference-modes: unknown mode {part!r}; use {', '.join(REFERENCE_MODES)} or all")
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


def _img2img_options(args: argparse.Namespace) -> dict:
    """``--init S`` or ``--hires X`` with ``--hires-steps`` / ``--hires-strength`` / ``--hires-upscaler``."""
    init = getattr(args, "init", None)
    scale = getattr(args, "hires", None)
    if init is not None and scale is not None:
        raise UserError("--init and --hires measure different renders (A1111's hires fix is text-to-image): "
                        "give one of them")
    out: dict = {}
    if init is not None:
        out["init_strength"] = init
    if scale is not None:
        out.update(hires_scale=scale, hires_steps=getattr(args, "hires_steps", 0) or 0,
                   hires_strength=getattr(args, "hires_strength", None) or 0.7,
                   hires_upscaler=getattr(args, "hires_upscaler", None) or "Latent")
    elif any(getattr(args, k, None) for k in ("hires_steps", "hires_strength", "hires_upscaler")):
        raise UserError("--hires-steps, --hires-strength and --hires-upscaler go with --hires X")
    return out


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
        **_img2img_options(args),
        preview=bool(getattr(args, "preview", False)),
    )
    for w, h in opts.sizes:
        opts.request(w, h, "init.png")  # steps, cfg, seed, hires: ConfigError names the bad one
    return opts
