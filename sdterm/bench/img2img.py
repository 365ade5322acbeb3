"""``sdterm bench --init S`` and ``--hires X``: img2img and hires-fix rows, and diffusers beside them.

sdterm's rows are the usual ones (``run.bench_sdterm``) with an init image the bench writes (a
smooth gradient with detail, at each size) or with the hires fix on. The reference is diffusers
all on the device, timed like the text-to-image reference (the prompt encoded up front, a warm-up,
then the timed renders):

* ``--init S``: ``StableDiffusionImg2ImgPipeline`` from the same init image at strength S and the
  same steps (diffusers makes int(steps * S) updates, A1111 and sdterm t_enc = int(min(S, 0.999) *
  steps): the same work but for DDIM's one-stride noise level, tests/test_img2img.py).
* ``--hires X``: what a hires fix is made of in diffusers: ``StableDiffusionPipeline`` at the base
  size to a latent, ``F.interpolate`` (bilinear, A1111's "Latent"), then
  ``StableDiffusionImg2ImgPipeline`` from that latent at the hires size with as many updates as
  sdterm's hires pass makes, decoded whole at the hires size.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

from .device import budget_errors, clean_device, error_line, note_peaks, release_device, sync_device
from .options import BenchOptions, Log
from .rows import Row


def write_init_image(folder: Path, width: int, height: int) -> Path:
    """A deterministic init image at width x height: colour gradients with fine detail."""
    import numpy as np
    from PIL import Image

    path = folder / f"init-{width}x{height}.png"
    if not path.exists():
        yy, xx = np.mgrid[0:height, 0:width]
        u, v = xx / width, yy / height
        rgb = np.stack([200 * u + 30 * np.sin(xx / 7.0), 180 * v + 40, 120 + 90 * np.sin(9 * u * v) * np.cos(yy / 11.0)],
                       -1)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(path)
    return path


def target_size(req) -> tuple[int, int] | None:
    """A hires request's final size (None otherwise)."""
    from ..params import hires_size

    return hires_size(req) if req.hires else None


def diffusers_steps(updates: int, strength: float) -> int:
    """The fewest ``num_inference_steps`` for which diffusers' img2img makes ``updates`` updates at
    ``strength`` (it makes int(steps * strength))."""
    n = max(1, math.floor(updates / strength) - 1)
    while int(n * strength) < updates:
        n += 1
    return n


def bench_img2img_reference(engine, opts: BenchOptions, modes: tuple[str, ...], log: Log, folder: Path,
                            notes: list[str]) -> list[Row]:
    """diffusers all on the device for the ``--init`` / ``--hires`` rows (its other modes, offload
    and torch.compile, are not measured here: a note says so)."""
    if not modes:
        return []
    skipped = [m for m in modes if m != "gpu"]
    if skipped:
        notes.append(f"{opts.kind} reference: diffusers all on the device only ({', '.join(skipped)} not measured)")
    if "gpu" not in modes:
        return []
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return _reference_rows(engine, opts, log, folder)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _reference_rows(engine, opts: BenchOptions, log: Log, folder: Path) -> list[Row]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from .reference import build_pipeline, reference_weights

    device, dtype = engine.device, engine.dtype
    release_device(engine)
    soft = budget_errors()
    base = build_pipeline(engine, reference_weights(engine, encoder=True), dtype)
    parts = base.components
    img2img = StableDiffusionImg2ImgPipeline(**parts)
    txt2img = StableDiffusionPipeline(**parts)
    for p in (img2img, txt2img):
        p.set_progress_bar_config(disable=True)
    rows: list[Row] = []
    try:
        img2img.to(device)
        guided = opts.cfg > 1.0
        with torch.inference_mode():
            cond, uncond = img2img.encode_prompt(opts.prompt, device, 1, guided, negative_prompt=opts.negative)
        for w, h in opts.sizes:
            req = opts.request(w, h, str(write_init_image(folder, w, h)))
            row = Row("diffusers", w, h, "gpu", mode="gpu", target=target_size(req),
                      plan="txt2img + latent upscale + img2img, pipe.to(device)" if req.hires
                      else "img2img, pipe.to(device)")
            rows.append(row)
            log(f"diffusers {row.size} {row.plan}: warm-up + {opts.repeats} timed")
            try:
                _time_row(row, lambda: _render(txt2img, img2img, req, cond, uncond if guided else None, device),
                          opts.repeats, device)
            except soft as exc:
                row.error = error_line(exc)
                log(f"  {row.error}")
                clean_device(device)
    finally:
        img2img = txt2img = base = parts = None  # the pipelines go before the device is cleaned
        clean_device(device)
    return rows


def _render(txt2img, img2img, req, cond, uncond, device):
    """One diffusers render of ``req`` (img2img or hires fix); the PIL image."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ..engine.hires import hires_steps
    from ..engine.sampling.noise import latents_noise

    common = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=req.cfg,
                  generator=torch.Generator("cpu").manual_seed(req.seed))
    with torch.inference_mode():
        if not req.hires:
            with Image.open(req.init_image) as im:
                image = im.convert("RGB")
            steps = req.steps
            return img2img(image=image, strength=req.strength, num_inference_steps=steps, **common).images[0]
        noise, _ = latents_noise(req.seed, req.width, req.height)
        latents = txt2img(latents=noise.to(device, cond.dtype), num_inference_steps=req.steps, width=req.width,
                          height=req.height, output_type="latent", **common).images
        w, h = target_size(req)
        up = F.interpolate(latents.float(), size=(h // 8, w // 8), mode="bilinear").to(cond.dtype)
        _, t = hires_steps(req)
        updates = max(t, 1)  # sdterm's DDIM hires pass: t_enc updates (k-diffusion: t_enc + 1 steps)
        return img2img(image=up, strength=req.hires_strength,
                       num_inference_steps=diffusers_steps(updates, req.hires_strength), **common).images[0]


def _time_row(row: Row, render, repeats: int, device) -> None:
    import torch

    render()  # warm-up
    for _ in range(repeats):
        gc.collect()
        sync_device(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        image = render()
        sync_device(device)
        row.seconds.append(time.perf_counter() - t0)
        note_peaks(row, device)
        row.image = image
