"""The render-parameter flags: one per :class:`~sdterm.params.Params` field, shared by ``sdterm
generate``, the app (``sdterm`` with no command), the lines of a ``--from-file`` batch and
``sdterm bench``'s number flags.

A flag's ``dest`` is its field's name (``--subseed-strength`` -> ``subseed_strength``), so
:func:`params_from_args` needs no table: a new parameter is its field in ``params.py`` and its
``add_argument`` line here.
"""

from __future__ import annotations

import argparse
import os

from .errors import ConfigError
from .infotext_hires import upscaler_name
from .params import FIELDS, HIRES_UPSCALERS, MAX_SEED, RESIZE_MODES, Params
from .samplers import RNGS, SAMPLERS, SCHEDULES, schedule_name, split_sampler
from .units import parse_wh


def whole_number(text: str) -> int:
    """argparse type: an integer (the range is the validator's to check, with its own message)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text: str) -> float:
    """argparse type: a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def sampler_choice(text: str) -> str:
    """argparse type: a sampler by A1111's name, any case, an alias (``k_euler_a``) or an old combined
    name ("DPM++ 2M Karras"); the canonical text, which :func:`params_from_args` splits."""
    split = split_sampler(text)
    if split is None:
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; one of: {', '.join(SAMPLERS)}")
    return split[0] if split[1] is None else f"{split[0]} {split[1]}"


def schedule_choice(text: str) -> str:
    """argparse type: a schedule type by A1111's label or internal name, any case."""
    name = schedule_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown schedule {text!r}; one of: {', '.join(SCHEDULES)}")
    return name


def rng_choice(text: str) -> str:
    """argparse type: cpu, nv or gpu (any case: A1111 writes "NV")."""
    if text.strip().lower() not in RNGS:
        raise argparse.ArgumentTypeError(f"unknown rng {text!r}; one of: {', '.join(RNGS)}")
    return text.strip().lower()


def resize_mode_choice(text: str) -> str:
    """argparse type: an img2img resize mode by A1111's name (any case, ``-``/``_`` for spaces) or its
    API number 0/1/2."""
    if text.strip().isdigit() and int(text) < len(RESIZE_MODES):
        return RESIZE_MODES[int(text)]
    name = " ".join(text.strip().lower().replace("-", " ").replace("_", " ").split())
    if name not in RESIZE_MODES:
        names = ", ".join(f"{i} {n!r}" for i, n in enumerate(RESIZE_MODES))
        raise argparse.ArgumentTypeError(f"unknown resize mode {text!r}; one of: {names}")
    return name


def hires_scale_number(text: str) -> float:
    """argparse type: the hires fix's scale, ``2``, ``2x`` or ``1.5`` (the range is the validator's)."""
    try:
        return float(text.strip().removesuffix("x").removesuffix("X").removesuffix("×"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a scale such as 2, 2x or 1.5, got {text!r}") from None


def hires_size_pair(text: str) -> tuple[int, int]:
    """argparse type: the hires fix's target size, ``WxH``; ``Wx0`` or ``0xH`` gives one side and
    keeps the aspect (A1111's "Resize width/height to"). Ranges are the validator's."""
    try:
        size = parse_wh(text, "hires size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (0 for a side keeps the aspect: 1024x0)") from None
    if size == (0, 0):
        raise argparse.ArgumentTypeError("hires size 0x0 gives no size; name a width, a height or both (1024x0)")
    return size


def hires_upscaler_choice(text: str) -> str:
    """argparse type: a hires upscaler by A1111's name, any case ("latent (bicubic)", "lanczos")."""
    name = upscaler_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown hires upscaler {text!r}; one of: {', '.join(HIRES_UPSCALERS)}")
    return name


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The parameter flags shared by ``generate`` and the app (and the device and budget flags).

    Short forms: ``-s`` steps, ``-S`` seed, ``-C`` cfg, ``-W`` width, ``-H`` height (``-h`` stays help)."""
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt (the unconditional text)")
    p.add_argument("-S", "--seed", type=whole_number, default=None, help=f"0..{MAX_SEED}; random when left out")
    p.add_argument("-s", "--steps", type=whole_number, default=None, help="sampling steps (default 50)")
    p.add_argument("-C", "--cfg", type=number, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("-W", "--width", type=whole_number, default=None, help="multiple of 8 (default 512)")
    p.add_argument("-H", "--height", type=whole_number, default=None, help="multiple of 8 (default 512)")
    p.add_argument("--eta", type=number, default=0.0, help="DDIM eta, 0..1 (default 0: deterministic)")
    p.add_argument("--subseed", type=whole_number, default=0, help="variation seed (mixed in by --subseed-strength)")
    p.add_argument("--subseed-strength", type=number, default=0.0, help="variation strength 0..1 (default 0)")
    p.add_argument("--sampler", type=sampler_choice, default=None, metavar="NAME",
                   help='A1111\'s name, e.g. "DPM++ 2M", "Euler a" (default DDIM); "DPM++ 2M Karras" sets the schedule too')
    p.add_argument("--schedule", type=schedule_choice, default=None, metavar="NAME",
                   help="schedule type: Automatic (the sampler's own; default), Uniform, Karras, Exponential...")
    p.add_argument("--rng", type=rng_choice, default=None, metavar="cpu|nv|gpu",
                   help="noise source: cpu (default), nv (A1111's default GPU noise, on any device), gpu")
    p.add_argument("--eta-ancestral", type=number, default=None, metavar="F",
                   help="A1111's Eta for the ancestral and SDE samplers, 0..1 (default 1)")
    p.add_argument("--ensd", type=whole_number, default=None, metavar="N",
                   help="A1111's eta noise seed delta for the ancestral samplers' noise (default 0)")
    p.add_argument("--clip-skip", type=whole_number, default=None, metavar="N",
                   help="A1111's Clip skip: 1 = CLIP's last layer (default), 2 = the one before it, ...")
    p.add_argument("--init-image", type=os.path.expanduser, default=None, metavar="PATH",
                   help="img2img: start from this image (PNG, JPEG, WebP) instead of noise")
    p.add_argument("--strength", "--denoising-strength", dest="strength", type=number, default=None, metavar="S",
                   help="img2img: A1111's denoising strength, 0..1 (default 0.75; 0 keeps the init image)")
    p.add_argument("--resize-mode", type=resize_mode_choice, default=None, metavar="MODE",
                   help='img2img: how the init image fits the size: "just resize" (0, default), '
                        '"crop and resize" (1), "resize and fill" (2)')
    p.add_argument("--hires-scale", type=hires_scale_number, default=None, metavar="X",
                   help="hires fix: render at the size, upscale by X (1 ... 4; 2, 2x, 1.5) and refine (A1111's "
                        "Upscale by; default off)")
    p.add_argument("--hires-size", type=hires_size_pair, default=None, metavar="WxH",
                   help="hires fix: upscale to WxH instead (Wx0 or 0xH: one side, the aspect kept; both: cover and crop)")
    p.add_argument("--hires-steps", type=whole_number, default=None, metavar="N",
                   help="hires fix: steps of the second pass (default 0: as many as --steps)")
    p.add_argument("--hires-strength", "--hires-denoising-strength", dest="hires_strength", type=number,
                   default=None, metavar="S", help="hires fix: the second pass's denoising strength (default 0.7)")
    p.add_argument("--hires-upscaler", type=hires_upscaler_choice, default=None, metavar="NAME",
                   help='hires fix: "Latent" (default), "Latent (bicubic)"..., "Lanczos", "Nearest", "None" (A1111\'s names)')
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    p.add_argument(
        "--vram-budget",
        metavar="SIZE",
        default=None,
        help="GPU memory sdterm may use, e.g. 1.5G or 900M (default: the free memory minus 512 MiB)",
    )


def params_from_args(args: argparse.Namespace) -> Params:
    """The parameters the parsed flags give (not validated): each field from the attribute of its
    name, its default where the namespace has none (or None: a flag left out). ConfigError (one line,
    the engine's own words) for an ``--init-image`` that doesn't exist, before any model is loaded."""
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    if "sampler" in given and (split := split_sampler(given["sampler"])) is not None:
        given["sampler"] = split[0]  # a combined name's schedule, unless --schedule names one
        if split[1] is not None:
            given.setdefault("schedule", split[1])
    size = getattr(args, "hires_size", None)
    if size is not None:
        given["hires_width"], given["hires_height"] = size
    init = given.get("init_image")
    if isinstance(init, str) and init and "\0" not in init and not os.path.exists(init):
        raise ConfigError(f"init image {init}: no such file; check the path")
    return Params(**given)
