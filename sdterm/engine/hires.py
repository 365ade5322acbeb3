"""The hires fix, as AUTOMATIC1111's txt2img "Hires. fix" (``StableDiffusionProcessingTxt2Img``).

1. The first pass is a plain text-to-image render at ``width x height`` (the same noise, prompt
   schedule and sampler: with the same seed it equals a render without the hires fix).
2. Upscale to :func:`sdterm.params.hires_geometry`'s size: a latent upscaler interpolates the latent
   (``F.interpolate`` with A1111's mode and antialias flag, no VAE round trip); a pixel upscaler
   decodes it (uint8 by truncation, as A1111's ``decode_first_stage`` path), resizes it with PIL
   (A1111's ``resize_image`` with an upscaler: "None" one Lanczos resize, "Lanczos"/"Nearest" the
   ``Upscaler.upscale`` loop then a Lanczos fit) and encodes it again (the posterior mean: A1111
   samples it from an unseeded global generator). A pixel size that is not a multiple of 8 is
   cut to one at the right and bottom (A1111's encoder drops those pixels through its strided
   convolutions instead). Both resize sizes given: the latent is cropped to them, centred.
3. The second pass is img2img from that latent at the hires size, always on A1111's "fixed
   steps" path (``setup_img2img_steps`` with ``steps`` passed): over a schedule of
   ``int(hires_steps / min(strength, 0.999))`` steps starting at t_enc = ``hires_steps - 1``;
   its noise is the first draw of a fresh generator at the hires shape from the same seeds (not
   the first pass's noise upscaled); the prompt schedule runs over the hires steps with A1111's
   offsets (``[a:b:1.5]`` switches halfway through the hires pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..params import LATENT_UPSCALERS, HiresGeometry, Params, hires_geometry
from ..params import hires_schedule as hires_steps  # noqa: F401  (the engine's name for it)

LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's ``shared.latent_upscale_modes``: name -> (``F.interpolate`` mode, antialias)."""
assert tuple(LATENT_MODES) == LATENT_UPSCALERS

PIXEL_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
"""A1111's UpscalerLanczos / UpscalerNearest: one PIL resize by the scale per round."""


def hires_request(p: Params) -> Params:
    """The second pass as a render of its own: the hires size and the schedule's step count (the
    hires fields cleared, so it is not a hires render itself)."""
    width, height = hires_geometry(p).size
    steps, _ = hires_steps(p)
    return p.replace(width=width, height=height, steps=steps, hires_scale=0.0, hires_width=0, hires_height=0)


def crop(latents: torch.Tensor, geo: HiresGeometry) -> torch.Tensor:
    """A1111's centred crop of the upscaled latent to both resize sizes (the odd row at the end)."""
    cx, cy = geo.crop
    if not cx and not cy:
        return latents
    h, w = latents.shape[-2:]
    return latents[..., cy // 2: h - (cy + 1) // 2, cx // 2: w - (cx + 1) // 2]


def upscale_latent(latents: torch.Tensor, p: Params) -> torch.Tensor:
    """The first pass's latent at the hires size, fp32 (a latent upscaler)."""
    geo = hires_geometry(p)
    mode, antialias = LATENT_MODES[p.hires_upscaler]
    size = (geo.upscale[1] // 8, geo.upscale[0] // 8)
    return crop(F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias), geo)


def upscale_image(image: Image.Image, p: Params) -> Image.Image:
    """The first pass's image at the hires upscale size (a pixel upscaler), as A1111's
    ``images.resize_image(0, image, w, h, upscaler_name)``, cut to a multiple of 8."""
    w, h = hires_geometry(p).upscale
    lanczos = Image.Resampling.LANCZOS
    resample = PIXEL_RESAMPLE.get(p.hires_upscaler)
    scale = max(w / image.width, h / image.height)
    if resample is not None and scale > 1.0:  # Upscaler.upscale
        dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
        for i in range(3):
            if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
                break
            shape = image.size
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
            if shape == image.size:
                break
        if image.size != dest:
            image = image.resize(dest, resample=lanczos)
    if image.size != (w, h):
        image = image.resize((w, h), resample=lanczos)
    if w % 8 or h % 8:
        image = image.crop((0, 0, w // 8 * 8, h // 8 * 8))
    return image


def is_latent(p: Params) -> bool:
    return p.hires_upscaler in LATENT_MODES
