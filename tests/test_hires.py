"""The hires fix (issue 16) against references sdterm's code did not write.

* The first pass is a plain text-to-image render: bit for bit the latents of the same request
  without the hires fix, and the same U-Net calls.
* The second pass is A1111's ``sample_hr_pass``: the first pass's latent upscaled by
  ``F.interpolate`` in A1111's mode (here written out by the test), noise = the first draw of a
  fresh generator at the hires shape from the same seed, and ``sample_img2img`` on the fixed-steps
  path (``setup_img2img_steps`` with steps passed: a schedule of int(steps / min(s, 0.999)) steps,
  t_enc = steps - 1). k-diffusion samplers: k-diffusion's own ``sample_euler`` /
  ``sample_dpmpp_2m`` over ``sigmas[steps' - t_enc - 1:]`` (exactly ``hires_steps`` steps);
  DDIM: CompVis's ``stochastic_encode`` + ``decode`` loop at that t_enc (the img2img tests pin
  the CompVis form against diffusers).
* Pixel upscalers: the reference decodes the first pass with diffusers' VAE, truncates to uint8
  (A1111), resizes with PIL and encodes with diffusers' VAE (posterior mean).
* The prompt schedule in the hires pass follows A1111's hires offsets.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
import torch.nn.functional as F
from PIL import Image

from sdterm.engine import pipeline as engine_pipeline
from sdterm.engine.events import StepDone
from sdterm.engine.sampling.rng import ImageRNG
from sdterm.params import Params

from .test_img2img import (CFG_SCALE, NEGATIVE, PROMPT, SEED, SIZE, UNetSpy, acp, assert_close, compvis_ddim_timesteps,
                           context, engine, guided_eps, pipe, rel_error)

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["context", "engine", "pipe"]  # fixtures shared with tests/test_img2img.py

BASE = {"prompt": PROMPT, "negative": NEGATIVE, "seed": SEED, "steps": 6, "cfg": CFG_SCALE, "width": SIZE,
        "height": SIZE, "sampler": "Euler", "schedule": "Karras"}


def render(engine, emit=None, **kw):
    with UNetSpy(engine) as spy:
        result = engine.generate(Params(**{**BASE, **kw}), **({"emit": emit} if emit else {}))
    return result, spy.calls


@pytest.fixture
def first_pass(monkeypatch):
    """The first pass's latents, as handed to the latent upscale."""
    seen = []
    real = engine_pipeline.upscale_latent

    def spy(latents, p):
        seen.append(latents.detach().clone())
        return real(latents, p)

    monkeypatch.setattr(engine_pipeline, "upscale_latent", spy)
    return seen


def fixed_steps(requested: int, strength: float) -> tuple[int, int]:
    """A1111's setup_img2img_steps with ``steps`` passed (the hires pass), written out here."""
    return int(requested / min(strength, 0.999)), requested - 1


def kdiff_second_pass(kd, pipe, context, init, noise, requested, strength, sampler):
    sampling, external = kd
    eps = guided_eps(pipe, context)

    class FakeCompVis:
        alphas_cumprod = acp().to(torch.float32)

        def apply_model(self, x, t, cond=None):
            return eps(x, t)

    model = external.CompVisDenoiser(FakeCompVis())
    steps, t_enc = fixed_steps(requested, strength)
    sigmas = sampling.get_sigmas_karras(n=steps, sigma_min=model.sigmas[0].item(), sigma_max=model.sigmas[-1].item())
    sched = sigmas[steps - t_enc - 1:]
    assert len(sched) == requested + 1  # the hires pass makes exactly the hires steps
    fn = {"Euler": sampling.sample_euler, "DPM++ 2M": sampling.sample_dpmpp_2m}[sampler]
    with torch.no_grad():
        return fn(model, init + noise * sched[0], sched, disable=True)


def compvis_second_pass(pipe, context, init, noise, requested, strength):
    """CompVis's stochastic_encode(init, t_enc) + decode(t_start=t_enc) over the DDIM timesteps of
    the fixed-steps schedule (eta 0)."""
    eps = guided_eps(pipe, context)
    steps, t_enc = fixed_steps(requested, strength)
    ac = acp()
    ts = compvis_ddim_timesteps(steps)
    alphas, alphas_prev = ac[ts], torch.cat([ac[:1], ac[ts[:-1]]])
    a = float(alphas[t_enc])
    x = a**0.5 * init + (1 - a) ** 0.5 * noise
    for index in reversed(range(t_enc)):
        e = eps(x, ts[index])
        a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
        x = a_prev**0.5 * (x - (1 - a_t) ** 0.5 * e) / a_t**0.5 + (1 - a_prev) ** 0.5 * e
    return x


def test_the_first_pass_is_the_plain_render(engine, first_pass):
    plain, plain_calls = render(engine)
    hires, calls = render(engine, hires_scale=2.0, hires_steps=3)
    assert len(first_pass) == 1 and torch.equal(first_pass[0].cpu(), plain.latents)
    assert len(calls) == len(plain_calls) + 3
    for (x, t, ctx), (px, pt, pctx) in zip(calls, plain_calls):
        assert torch.equal(x, px) and torch.equal(t, pt) and torch.equal(ctx, pctx)
    assert hires.image.size == (2 * SIZE, 2 * SIZE) and plain.image.size == (SIZE, SIZE)
    assert hires.request.width == SIZE  # the request (and the infotext's Size) stays the base size


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
@pytest.mark.parametrize("requested,strength,upscaler,mode,antialias", [
    (5, 0.7, "Latent", "bilinear", False),
    (4, 0.45, "Latent (bicubic antialiased)", "bicubic", True),
    (3, 1.0, "Latent (nearest)", "nearest", False),
])
def test_k_sampler_second_pass_matches_kdiffusion(kd, engine, pipe, context, first_pass, sampler, requested,
                                                  strength, upscaler, mode, antialias):
    result, calls = render(engine, sampler=sampler, hires_scale=2.0, hires_steps=requested, hires_strength=strength,
                           hires_upscaler=upscaler)
    init = F.interpolate(first_pass[0].float(), size=(2 * SIZE // 8, 2 * SIZE // 8), mode=mode, antialias=antialias)
    noise = ImageRNG(SEED, 2 * SIZE, 2 * SIZE).first()
    expected = kdiff_second_pass(kd, pipe, context, init, noise, requested, strength, sampler)
    assert_close(result.latents, expected)
    # not the first pass's noise upscaled, nor a generator continued from the first pass
    wrong = kdiff_second_pass(kd, pipe, context, init, F.interpolate(ImageRNG(SEED, SIZE, SIZE).first(), scale_factor=2),
                              requested, strength, sampler)
    assert rel_error(result.latents, wrong) > 1e-2


def test_hires_steps_zero_means_the_first_pass_steps(kd, engine, pipe, context, first_pass):
    result, calls = render(engine, hires_scale=1.5)
    assert len(calls) == 2 * BASE["steps"]  # Euler: one call a step, each pass 6 steps
    side = int(SIZE * 1.5) // 8
    init = F.interpolate(first_pass[0].float(), size=(side, side), mode="bilinear")
    expected = kdiff_second_pass(kd, pipe, context, init, ImageRNG(SEED, side * 8, side * 8).first(), BASE["steps"],
                                 0.7, "Euler")
    assert_close(result.latents, expected)
    assert result.image.size == (side * 8, side * 8)


@pytest.mark.parametrize("requested,strength", [(5, 0.7), (8, 0.5)])
def test_ddim_second_pass_is_compvis_img2img_on_the_fixed_steps_path(engine, pipe, context, first_pass, requested,
                                                                     strength):
    result, calls = render(engine, sampler="DDIM", schedule="Automatic", hires_scale=2.0, hires_steps=requested,
                           hires_strength=strength)
    steps, t_enc = fixed_steps(requested, strength)
    hires_calls = calls[BASE["steps"]:]
    stride = 1000 // steps
    assert [int(c[1].reshape(-1)[0]) for c in hires_calls] == [k * stride + 1 for k in reversed(range(t_enc))]
    init = F.interpolate(first_pass[0].float(), scale_factor=2, mode="bilinear")
    expected = compvis_second_pass(pipe, context, init, ImageRNG(SEED, 2 * SIZE, 2 * SIZE).first(), requested, strength)
    assert_close(result.latents, expected)


def test_both_resize_sizes_crop_the_latent_centred(kd, engine, pipe, context, first_pass):
    """64x64 to 160x96: A1111 upscales to cover (160x160), then crops (160-96)//8 = 8 latent rows,
    4 from the top and 4 from the bottom."""
    result, _ = render(engine, hires_width=160, hires_height=96, hires_steps=3)
    assert result.image.size == (160, 96)
    up = F.interpolate(first_pass[0].float(), size=(20, 20), mode="bilinear")[..., 4:16, :]
    expected = kdiff_second_pass(kd, pipe, context, up, ImageRNG(SEED, 160, 96).first(), 3, 0.7, "Euler")
    assert_close(result.latents, expected)
    off_centre = F.interpolate(first_pass[0].float(), size=(20, 20), mode="bilinear")[..., :12, :]
    assert rel_error(result.latents,
                     kdiff_second_pass(kd, pipe, context, off_centre, ImageRNG(SEED, 160, 96).first(), 3, 0.7,
                                       "Euler")) > 1e-2


def diffusers_pixel_init(pipe, latents: torch.Tensor, size: tuple[int, int], resample) -> torch.Tensor:
    """A1111's pixel path with diffusers' VAE: decode, clamp, 255 * x truncated, PIL resize, encode
    (posterior mean * 0.18215)."""
    with torch.no_grad():
        decoded = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample
    x = torch.clamp((decoded + 1) / 2, 0, 1)[0].permute(1, 2, 0).numpy()
    image = Image.fromarray((255.0 * x).astype(np.uint8)).resize(size, resample=resample)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@pytest.mark.parametrize("upscaler,resample", [("Lanczos", Image.Resampling.LANCZOS), ("None", Image.Resampling.LANCZOS),
                                               ("Nearest", Image.Resampling.NEAREST)])
def test_pixel_upscaler_decodes_resizes_and_encodes(kd, engine, pipe, context, monkeypatch, upscaler, resample):
    seen = []
    real = engine_pipeline.upscale_image
    monkeypatch.setattr(engine_pipeline, "upscale_image", lambda image, p: seen.append(image) or real(image, p))
    plain, _ = render(engine)
    result, _ = render(engine, hires_scale=2.0, hires_steps=3, hires_upscaler=upscaler)
    assert len(seen) == 1 and seen[0].size == (SIZE, SIZE)
    init = diffusers_pixel_init(pipe, plain.latents, (2 * SIZE, 2 * SIZE), resample)
    expected = kdiff_second_pass(kd, pipe, context, init, ImageRNG(SEED, 2 * SIZE, 2 * SIZE).first(), 3, 0.7, "Euler")
    assert_close(result.latents, expected, rel_tol=1e-3)  # a uint8 boundary may fall apart between the two VAEs
    latent, _ = render(engine, hires_scale=2.0, hires_steps=3)
    assert rel_error(result.latents, latent.latents) > 1e-2


def test_the_prompt_schedule_in_the_hires_pass_uses_a1111s_offsets(engine):
    """``[fox:owl:1.5]``: "fox" for the whole first pass (1.5 of it is past its end); in the hires
    pass (4 steps) the switch comes at int((1.5 - 1) * 4) = 2, so the denoiser's calls 0, 1, 2 use
    "fox" and call 3 "owl" (A1111's count: an entry is used while call <= its end). A schedule's
    entries are one A1111 batch (its emphasis mean is the batch's), so the contexts to expect come
    from a first-pass schedule of the same two texts."""
    _, plain = render(engine, prompt="a red fox", steps=1)
    _, pair = render(engine, prompt="a red [fox:owl:1]", steps=3)  # calls 0, 1: fox; call 2: owl
    fox, fox_in_pair, owl_in_pair = plain[0][2], pair[0][2], pair[2][2]
    assert not torch.equal(fox_in_pair, owl_in_pair)

    def names(calls):
        return ["fox" if torch.equal(c[2], fox) else "fox*" if torch.equal(c[2], fox_in_pair)
                else "owl*" if torch.equal(c[2], owl_in_pair) else "?" for c in calls]

    _, calls = render(engine, prompt="a red [fox:owl:1.5]", hires_scale=2.0, hires_steps=4)
    assert names(calls) == ["fox"] * BASE["steps"] + ["fox*", "fox*", "fox*", "owl*"]
    _, calls = render(engine, prompt="a red [fox:owl:0.5]", hires_scale=2.0, hires_steps=4)
    # first pass: ends at int(0.5 * 6) = 3, calls 0..3 "fox"; the hires pass is past the switch: "owl" only
    assert names(calls)[:BASE["steps"]] == ["fox*"] * 4 + ["owl*"] * 2
    owl = render(engine, prompt="a red owl", steps=1)[1][0][2]
    assert all(torch.equal(c[2], owl) for c in calls[BASE["steps"]:])


def test_progress_counts_each_pass(engine):
    events = []
    render(engine, emit=events.append, hires_scale=2.0, hires_steps=3)
    steps = [(e.step, e.total) for e in events if isinstance(e, StepDone)]
    assert steps == [(i, 6) for i in range(1, 7)] + [(i, 3) for i in range(1, 4)]
    finished = [e.stats.stage for e in events if type(e).__name__ == "StageFinished"]
    assert finished == ["text", "unet", "hires", "vae"]
