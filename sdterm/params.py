"""The one record of render parameters: what the engine renders, what the app holds for the next
render, what a history line and an image's ``sdterm`` PNG chunk store.

:class:`Params` is a frozen dataclass with its limits, its validator (the one validator: the
command line, the slash commands, the settings file and stored records all go through it) and
its conversion to and from a plain dict (JSON). A leaf: it imports only :mod:`sdterm.errors` and the
names of :mod:`sdterm.samplers`, so the engine may import it.

Adding a parameter (a sampler, clip skip, a LoRA) is one field here, with its default and its check
in :meth:`Params.validated`; stored records written before it read back with the default. Only
the command line flag (``sdterm/options.py``) and the AUTOMATIC1111 infotext key
(``sdterm/pngmeta.py``) are named elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigError
from .samplers import DEFAULT_RNG, DEFAULT_SAMPLER, DEFAULT_SCHEDULE, RNGS, SAMPLERS, SCHEDULES

MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_CFG = 50.0
MAX_CLIP_SKIP = 12
RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
"""A1111's img2img resize modes, in the order of its API's 0/1/2 (``sdterm/engine/init_image.py`` applies them)."""
LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                    "Latent (nearest)", "Latent (nearest-exact)")
"""A1111's latent upscale modes for the hires fix (``shared.latent_upscale_modes``): the first
pass's latent is interpolated, no VAE round trip."""
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
"""A1111's built-in pixel-space upscalers: the first pass is decoded, resized (PIL), encoded."""
HIRES_UPSCALERS = LATENT_UPSCALERS + PIXEL_UPSCALERS
MAX_HIRES_SCALE = 4.0


@dataclass(frozen=True)
class Params:
    """The parameters of one render. Not validated on construction: call :meth:`validated`."""

    prompt: str = ""
    """What to draw. Empty renders unconditionally."""
    negative: str = ""
    """The unconditional text for classifier-free guidance."""
    seed: int = 0
    """0 ... 2^32-1; the starting noise is drawn on the CPU from this seed."""
    steps: int = 50
    """Sampling steps, 1 ... 1000."""
    cfg: float = 7.5
    """Classifier-free guidance scale; 1 disables guidance (one U-Net pass per step)."""
    width: int = 512
    """Image width in pixels, a multiple of 8."""
    height: int = 512
    """Image height in pixels, a multiple of 8."""
    eta: float = 0.0
    """DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise."""
    subseed: int = 0
    """Variation seed (AUTOMATIC1111): a second seed whose noise is mixed into the first."""
    subseed_strength: float = 0.0
    """Variation strength 0..1: spherical interpolation from the seed's noise toward the subseed's."""
    sampler: str = DEFAULT_SAMPLER
    """The sampler, by its AUTOMATIC1111 name (``sdterm/samplers.py``)."""
    schedule: str = DEFAULT_SCHEDULE
    """A1111's "Schedule type" ("Automatic": the sampler's own default)."""
    rng: str = DEFAULT_RNG
    """Where the noise comes from: "cpu" (torch's CPU generator), "nv" (A1111's NV: the numbers an
    NVIDIA GPU gives, on any device) or "gpu" (torch.randn on CUDA)."""
    eta_ancestral: float = 1.0
    """A1111's "Eta" for the ancestral and SDE samplers (``eta`` is DDIM's own, as in A1111)."""
    ensd: int = 0
    """A1111's eta noise seed delta ("ENSD"): added to the seed for the per-step noise of the
    samplers that use it."""
    clip_skip: int = 1
    """A1111's "Clip skip": 1 uses the text encoder's last layer, N the hidden state N - 1 layers
    before it (through the final layer norm)."""
    init_image: str = ""
    """img2img: the path of the init image ("" renders text-to-image). Only the engine opens it."""
    strength: float = 0.75
    """A1111's "Denoising strength", 0..1: how much of the init image is noised away (used only
    with an init image; 1 keeps nothing of it but its colours' placement, 0 keeps it all)."""
    resize_mode: str = "just resize"
    """How the init image is fitted to width x height: one of :data:`RESIZE_MODES` (A1111's names)."""
    hires_scale: float = 0.0
    """A1111's hires fix "Upscale by": render at width x height, upscale by this factor (1 ... 4),
    then refine at that size by img2img. 0: no hires fix (unless a hires size is given)."""
    hires_width: int = 0
    """Hires fix "Resize width to" (0: from the scale, or from ``hires_height`` keeping the aspect)."""
    hires_height: int = 0
    """Hires fix "Resize height to" (0: as ``hires_width``). Width and height both given: the
    upscale covers them and the latent is cropped to them, centred (A1111)."""
    hires_steps: int = 0
    """Hires fix "Hires steps": the second pass's steps (0: as many as ``steps``)."""
    hires_strength: float = 0.7
    """The hires pass's denoising strength (above 0); A1111 writes it as "Denoising strength"."""
    hires_upscaler: str = "Latent"
    """One of :data:`HIRES_UPSCALERS`, A1111's names."""

    def validated(self) -> "Params":
        """``self``, or ConfigError with one line naming the first bad parameter and the allowed range."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative, str):
            raise ConfigError("prompt and negative prompt must be text")
        _check_int("seed", self.seed, 0, MAX_SEED)
        _check_int("steps", self.steps, 1, MAX_STEPS)
        _check_float("cfg", self.cfg, 0.0, MAX_CFG)
        _check_float("eta", self.eta, 0.0, 1.0)
        _check_int("variation seed", self.subseed, 0, MAX_SEED)
        _check_float("variation strength", self.subseed_strength, 0.0, 1.0)
        _check_float("eta (ancestral)", self.eta_ancestral, 0.0, 1.0)
        _check_int("ENSD", self.ensd, 0, MAX_SEED)
        _check_int("clip skip", self.clip_skip, 1, MAX_CLIP_SKIP)
        _check_name("sampler", self.sampler, tuple(SAMPLERS))
        _check_name("schedule", self.schedule, SCHEDULES)
        _check_name("rng", self.rng, RNGS)
        if not isinstance(self.init_image, str) or "\0" in self.init_image:
            raise ConfigError("init image must be a file path without NUL characters")
        _check_float("strength", self.strength, 0.0, 1.0)
        _check_name("resize mode", self.resize_mode, RESIZE_MODES)
        self._check_hires()
        for name, side in (("width", self.width), ("height", self.height)):
            _check_int(name, side, 8, MAX_SIDE)
            if side % 8:
                lower, upper = side - side % 8, side - side % 8 + 8
                raise ConfigError(f"{name} must be a multiple of 8, got {side} (try {lower} or {upper})")
        return self

    @property
    def hires_pass_steps(self) -> int:
        """The steps the hires pass is asked for: ``hires_steps``, or 0 for the first pass's."""
        return self.hires_steps or self.steps

    @property
    def hires(self) -> bool:
        """True when the hires fix is on: a scale or a hires size is given."""
        return self.hires_scale > 0 or self.hires_width > 0 or self.hires_height > 0

    def _check_hires(self) -> None:
        if self.hires_scale != 0:
            _check_float("hires scale", self.hires_scale, 1.0, MAX_HIRES_SCALE)
        _check_float("hires scale", self.hires_scale, 0.0, MAX_HIRES_SCALE)
        for name, side in (("hires width", self.hires_width), ("hires height", self.hires_height)):
            _check_int(name, side, 0, MAX_SIDE)
            if 0 < side < 64:
                raise ConfigError(f"{name} must be 0 (from the scale) or at least 64, got {side}")
        _check_int("hires steps", self.hires_steps, 0, MAX_STEPS)
        _check_float("hires strength", self.hires_strength, 0.0, 1.0)
        _check_name("hires upscaler", self.hires_upscaler, HIRES_UPSCALERS)
        if not self.hires:
            return
        if self.hires_strength <= 0:
            raise ConfigError("hires strength must be above 0 (at 0 the hires pass has no steps); "
                              "turn the hires fix off instead")
        if self.init_image:
            raise ConfigError("the hires fix renders text-to-image (as A1111's); "
                              "turn it off for img2img, or upscale with a larger size and a strength")
        requested = self.hires_pass_steps
        schedule, _ = hires_schedule(self)
        if schedule > MAX_STEPS:
            raise ConfigError(f"hires pass of {requested} steps at strength {self.hires_strength:g} needs a "
                              f"{schedule}-step schedule, over {MAX_STEPS}; raise the hires strength or lower the steps")
        w, h = hires_size(self)
        if w < 8 or h < 8 or w > MAX_SIDE or h > MAX_SIDE:
            raise ConfigError(f"hires fix size {w}x{h} is outside 8 ... {MAX_SIDE} pixels a side; "
                              "choose a smaller scale or size")

    def replace(self, **changes: Any) -> "Params":
        """A copy with ``changes`` (not validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, in declaration order: the JSON that history lines and the PNG chunk store."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Params":
        """The validated parameters stored in ``data`` (a JSON object written by :meth:`to_dict`, now
        or by an earlier sdterm); ConfigError (a ValueError) with one line otherwise.

        Unknown keys are ignored (a newer sdterm may add some). :data:`REQUIRED` keys must be there;
        any other missing field takes its default (a record written before the field existed). The
        names of :data:`LEGACY_NAMES` are read when the field's own name is absent. A number given
        for a float field is made a float; anything else must have the field's type already.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("expected an object of parameters")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
            elif LEGACY_NAMES.get(f.name) in data:
                value = data[LEGACY_NAMES[f.name]]
            elif f.name in REQUIRED:
                raise ConfigError(f"missing {f.name}")
            else:
                continue
            if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
                try:
                    value = float(value)
                except OverflowError:
                    raise ConfigError(f"{f.name} is out of range") from None
            values[f.name] = value
        return cls(**values).validated()


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Params))
"""The field names, in declaration order."""

REQUIRED = ("prompt", "seed", "steps", "cfg", "width", "height")
"""Keys every stored record has held since the first sdterm (:meth:`Params.from_dict`)."""

LEGACY_NAMES = {"subseed": "variation_seed", "subseed_strength": "variation"}
"""Field -> the name history lines have given it since before the fields had one name. History
lines carry both names (see ``sdterm/history.py``); :meth:`Params.from_dict` reads either."""


def _check_name(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; one of: {', '.join(allowed)}")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")


@dataclass(frozen=True)
class HiresGeometry:
    """A1111's ``calculate_target_resolution``: the first pass is upscaled to ``upscale`` pixels
    (width, height; not rounded), its latent cropped by ``crop`` latent rows and columns (x, y:
    the excess over both resize sizes, half each side, the odd one at the end)."""

    upscale: tuple[int, int]
    crop: tuple[int, int] = (0, 0)

    @property
    def latent(self) -> tuple[int, int]:
        """(width, height) of the hires latent: the upscale floored to latent cells, then cropped."""
        return self.upscale[0] // 8 - self.crop[0], self.upscale[1] // 8 - self.crop[1]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the final image in pixels."""
        w, h = self.latent
        return w * 8, h * 8


def hires_geometry(p: Params) -> HiresGeometry:
    """Where the hires fix of ``p`` upscales to, exactly as A1111 computes it (integer floors)."""
    rx, ry = p.hires_width, p.hires_height
    if not rx and not ry:
        return HiresGeometry((int(p.width * p.hires_scale), int(p.height * p.hires_scale)))
    if not ry:
        return HiresGeometry((rx, rx * p.height // p.width))
    if not rx:
        return HiresGeometry((ry * p.width // p.height, ry))
    if p.width / p.height < rx / ry:
        to = (rx, rx * p.height // p.width)
    else:
        to = (ry * p.width // p.height, ry)
    return HiresGeometry(to, ((to[0] - rx) // 8, (to[1] - ry) // 8))


def hires_schedule(p: Params) -> tuple[int, int]:
    """(the schedule's steps, t_enc) of the hires pass: A1111's ``setup_img2img_steps`` on its
    fixed-steps path, which the hires pass always takes."""
    requested = p.hires_pass_steps
    return int(requested / min(p.hires_strength, 0.999)), requested - 1


def hires_size(p: Params) -> tuple[int, int]:
    """The final (width, height) of a hires-fix render."""
    return hires_geometry(p).size


MAX_BATCH = 64
"""The most images one batch (``generate -n``, the app's ``/n``) renders in a row."""


def batch(params: Params, count: int) -> list[Params]:
    """``count`` renders in a row, as AUTOMATIC1111's "Batch count" makes them: image ``i`` has
    seed + i (and, with a variation, variation seed + i), wrapping at 2^32. ConfigError for a count
    outside 1 ... :data:`MAX_BATCH`."""
    _check_int("batch count", count, 1, MAX_BATCH)
    return [
        params.replace(seed=(params.seed + i) % (MAX_SEED + 1),
                       subseed=(params.subseed + i) % (MAX_SEED + 1) if params.subseed_strength > 0 else params.subseed)
        for i in range(count)
    ]
