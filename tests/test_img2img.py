"""img2img (issue 16) against references that sdterm's code did not write.

* DDIM, eta 0: diffusers' ``StableDiffusionImg2ImgPipeline`` on the demo weights (built as ``sdterm
  bench`` builds its reference). The init latent goes in as a 4-channel ``image`` (diffusers then
  skips its own VAE encode and its posterior *sample*), its noise is patched to be sdterm's.
  diffusers and CompVis/A1111 differ in exactly one place (research notes, section 1): for t_enc
  updates both run the same last t_enc DDIM timesteps, the last to alphas_cumprod[0], but diffusers
  noises the init latent to alphas_cumprod[timesteps[t_start]] = the *first timestep it denoises*,
  (t_enc - 1) * stride + 1, while CompVis's ``stochastic_encode`` (and A1111) noise to
  ``ddim_alphas[t_enc]`` = t_enc * stride + 1, one stride higher. So
  (a) unpatched diffusers must differ from sdterm (and equal a CompVis loop noised one stride low);
  (b) with diffusers' ``scheduler.add_noise`` moved one stride up it must match sdterm's latents
      within 1e-4 relative and its image within one pixel level.
  With eta 0.7 and diffusers' per-step variance noise fed the seed generator's next draws (A1111's
  order, as txt2img), they agree too.
  A hand-written CompVis loop (``stochastic_encode`` + ``decode``) over diffusers' U-Net checks
  the patched pipeline independently of sdterm.
* The encoder: the init latent sdterm renders from is diffusers' ``latent_dist.mean * 0.18215``
  of the same prepared image (no posterior sample, no logvar).
* k-diffusion samplers: k-diffusion's own ``sample_euler`` / ``sample_dpmpp_2m`` (the PyPI
  package, tests/kdiff_reference.py) over A1111's slice ``sigmas[steps - t_enc - 1:]`` of the
  Karras schedule, from ``init + noise * sigma_sched[0]``.
* Strength edge cases: 1.0 is 0.999; t_enc 0 makes no update (the result is the noised init);
  the noise is the seed's first draw whatever the init image.

The conditioning both sides use is sdterm's own (captured at the U-Net's input: sdterm keeps it in
fp16 and normalises A1111-style, which would otherwise cost ~1e-3 here; the text encoder is
tested elsewhere).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as d_img2img
from diffusers.schedulers import scheduling_ddim as d_scheduling_ddim
from PIL import Image

from sdterm.bench.reference import build_pipeline, reference_weights
from sdterm.engine.init_image import prepare_init_image
from sdterm.engine.loading.demo import original_state_dict
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.sampling.rng import ImageRNG
from sdterm.params import Params


pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4
SIZE = 64
SEED = 5
CFG_SCALE = 7.5
PROMPT, NEGATIVE = "a red fox", "blurry"
DDIM_CASES = [(20, 0.3), (20, 0.6), (20, 0.95), (14, 0.6), (10, 0.95)]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel_tol: float = REL_TOL) -> None:
    """Relative L2 error below ``rel_tol``, and no element off by more than 10 * rel_tol of the peak.
    (Passing cases here sit at 2e-8 .. 5e-5; every breakage tried is far above 1e-3.)"""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    rel = rel_error(actual, expected)
    max_abs = float((actual.double() - expected.double()).abs().max())
    peak = float(expected.abs().max())
    assert rel < rel_tol, f"relative error {rel:.3e} >= {rel_tol:g} (max abs diff {max_abs:.3e}, peak {peak:.3e})"
    assert max_abs <= 10 * rel_tol * peak, f"max abs diff {max_abs:.3e} > {10 * rel_tol:g} * peak {peak:.3e}"


def t_enc_of(strength: float, steps: int) -> int:
    """A1111's setup_img2img_steps (img2img_fix_steps off), written out here."""
    return int(min(strength, 0.999) * steps)


def acp() -> torch.Tensor:
    """CompVis's alphas_cumprod (float64 here): betas linear in sqrt."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def compvis_ddim_timesteps(steps: int) -> list[int]:
    """CompVis make_ddim_timesteps("uniform"): ascending, + 1 (more than ``steps`` entries when
    ``steps`` doesn't divide 1000; counted from the bottom they are the same)."""
    return [t + 1 for t in range(0, 1000, 1000 // steps)]


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_model):
    return Engine(open_model(demo_model), "cpu")


@pytest.fixture(scope="module")
def pipe(engine):
    """diffusers' img2img pipeline on the demo weights (``sdterm bench``'s reference build), fp32,
    with the demo VAE encoder loaded too (through diffusers' own converter, strictly)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    base = build_pipeline(engine, reference_weights(engine), torch.float32)
    m = engine.models
    sd = original_state_dict(m.module("text"), m.module("unet"), m.module("vae"), m.module("vae_encoder"))
    base.vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(base.vae.config)), strict=True)
    base.vae.requires_grad_(False)
    c = base.components
    p = StableDiffusionImg2ImgPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                       unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    assert isinstance(p.scheduler, DDIMScheduler) and p.scheduler.config.steps_offset == 1
    assert not p.scheduler.config.set_alpha_to_one
    return p


@pytest.fixture(scope="module")
def init_paths(tmp_path_factory):
    """Two init images, different from each other, at the render size (no resize ambiguity)."""
    folder = tmp_path_factory.mktemp("init")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    a = np.stack([200 * xx + 20, 180 * yy + 30, 120 + 80 * np.sin(6 * xx * yy)], -1) + rng.normal(0, 12, (SIZE, SIZE, 3))
    b = np.stack([240 - 150 * yy, 60 + 150 * xx * yy, 200 * (xx > 0.5)], -1) + rng.normal(0, 20, (SIZE, SIZE, 3))
    paths = []
    for name, arr in (("a.png", a), ("b.png", b)):
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(folder / name)
        paths.append(str(folder / name))
    return paths


class UNetSpy:
    """Records each U-Net call's (x, t, context) in the engine: a forward pre-hook, removed on exit."""

    def __init__(self, engine):
        self.unet = engine.models.module("unet")
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __enter__(self):
        def hook(module, args):
            x, t, ctx = args[:3]
            self.calls.append((x.detach().clone(), torch.as_tensor(t).detach().clone(), ctx.detach().clone()))

        self.handle = self.unet.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def render(engine, **kw):
    """sdterm's render at the test size and prompts; (Result, the U-Net calls)."""
    base = {"prompt": PROMPT, "negative": NEGATIVE, "seed": SEED, "steps": 20, "cfg": CFG_SCALE, "width": SIZE,
            "height": SIZE, "sampler": "DDIM", "eta": 0.0}
    base.update(kw)
    with UNetSpy(engine) as spy:
        result = engine.generate(Params(**base))
    return result, spy.calls


@pytest.fixture(scope="module")
def context(engine):
    """sdterm's (uncond, cond) conditioning for PROMPT / NEGATIVE, each (1, 77, dim) fp32, as its
    U-Net sees it (from a one-step text-to-image render)."""
    _, calls = render(engine, steps=1)
    ctx = calls[0][2].float()
    assert ctx.shape[0] == 2, "expected cond and uncond in one batch"
    return ctx[:1], ctx[1:]


def seed_noise(seed: int = SEED) -> torch.Tensor:
    return ImageRNG(seed, SIZE, SIZE).first()


def diffusers_init_latent(pipe, path: str) -> torch.Tensor:
    """diffusers' VAE posterior mean * 0.18215 of sdterm's prepared image (the [-1, 1] tensor)."""
    image = prepare_init_image(path, SIZE, SIZE).tensor
    with torch.no_grad():
        return pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor


def guided_eps(pipe, context):
    """CFG over diffusers' U-Net with sdterm's conditioning: eps_u + scale (eps_c - eps_u)."""
    uncond, cond = context
    ctx = torch.cat([uncond, cond])

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        ts = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1].expand(2)
        with torch.no_grad():
            e_u, e_c = pipe.unet(torch.cat([x, x]), ts, encoder_hidden_states=ctx).sample.chunk(2)
        return e_u + CFG_SCALE * (e_c - e_u)

    return eps


def run_diffusers(pipe, monkeypatch, context, init: torch.Tensor, noise: torch.Tensor, steps: int,
                  strength: float, *, compvis_level: bool, eta: float = 0.0, step_noise=None):
    """diffusers' img2img from ``init`` (4 channels: no VAE encode) with ``noise`` as its noise.
    ``compvis_level``: its ``add_noise`` noises one DDIM stride higher (CompVis's / A1111's level).
    Returns (latents, the timestep add_noise actually used)."""
    drawn = []

    def noise_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), shape
        drawn.append(1)
        return noise.clone().to(device=device, dtype=dtype)

    monkeypatch.setattr(d_img2img, "randn_tensor", noise_tensor)
    step_draws = []
    if step_noise is not None:  # DDIM's per-step variance noise (eta > 0), drawn inside scheduler.step

        def variance_noise(shape, generator=None, device=None, dtype=None, layout=None):
            step_draws.append(1)
            return step_noise().to(device=device, dtype=dtype).reshape(shape)

        monkeypatch.setattr(d_scheduling_ddim, "randn_tensor", variance_noise)
    sched = pipe.scheduler
    used = []

    def add_noise(original, noise_, timesteps):
        if compvis_level:
            timesteps = timesteps + sched.config.num_train_timesteps // sched.num_inference_steps
        used.append(int(timesteps.reshape(-1)[0]))
        return DDIMScheduler.add_noise(sched, original, noise_, timesteps)

    monkeypatch.setattr(sched, "add_noise", add_noise)
    uncond, cond = context
    try:
        with torch.no_grad():
            out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=init.clone(), strength=strength,
                       num_inference_steps=steps, guidance_scale=CFG_SCALE, eta=eta, output_type="latent").images
    finally:
        monkeypatch.undo()
    assert drawn == [1] and len(used) == 1
    assert len(step_draws) == (t_enc_of(strength, steps) if eta > 0 else 0)
    return out, used[0]


def diffusers_image(pipe, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return np.round(pipe.image_processor.postprocess(decoded, output_type="np")[0] * 255).astype(np.int16)


def compvis_img2img(eps, init, noise, steps: int, strength: float, level_shift: int = 0) -> torch.Tensor:
    """CompVis scripts/img2img.py, DDIM eta 0: ``stochastic_encode(init, t_enc)`` then
    ``decode(z, t_start=t_enc)``. ``level_shift=-1`` noises one stride lower (diffusers' level)."""
    ac = acp()
    ts = compvis_ddim_timesteps(steps)
    alphas = ac[ts]
    alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    t_enc = int(strength * steps)
    a = float(alphas[t_enc + level_shift])
    x = a**0.5 * init + (1 - a) ** 0.5 * noise
    for index in reversed(range(t_enc)):
        e = eps(x, ts[index])
        a_t, a_prev = float(alphas[index]), float(alphas_prev[index])
        x0 = (x - (1 - a_t) ** 0.5 * e) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * e
    return x


# --------------------------------------------------------------------------------------------
# The references on their own (need no img2img in sdterm)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,strength", DDIM_CASES)
def test_reference_diffusers_at_compvis_level_is_compvis_ddim(pipe, context, init_paths, monkeypatch, steps, strength):
    """The patched pipeline is CompVis's img2img loop; unpatched it is that loop noised one stride
    lower: the noise level is the only difference."""
    init, noise = diffusers_init_latent(pipe, init_paths[0]), seed_noise()
    t_enc = t_enc_of(strength, steps)
    stride = 1000 // steps
    eps = guided_eps(pipe, context)
    shifted, level = run_diffusers(pipe, monkeypatch, context, init, noise, steps, strength, compvis_level=True)
    assert level == t_enc * stride + 1
    assert_close(shifted, compvis_img2img(eps, init, noise, steps, strength))
    plain, level = run_diffusers(pipe, monkeypatch, context, init, noise, steps, strength, compvis_level=False)
    assert level == (t_enc - 1) * stride + 1
    assert_close(plain, compvis_img2img(eps, init, noise, steps, strength, level_shift=-1))
    assert rel_error(plain, shifted) > 1e-2


def kdiff_img2img(kd, pipe, context, init, noise, steps: int, strength: float, sampler: str) -> torch.Tensor:
    """A1111's KDiffusionSampler.sample_img2img with k-diffusion's own code: Karras sigmas over
    the CompVisDenoiser's range, sliced at steps - t_enc - 1, xi = init + noise * sigma_sched[0]."""
    sampling, external = kd
    eps = guided_eps(pipe, context)

    class FakeCompVis:  # what CompVisDenoiser reads from a LatentDiffusion model
        alphas_cumprod = acp().to(torch.float32)

        def apply_model(self, x, t, cond=None):
            return eps(x, t)

    model = external.CompVisDenoiser(FakeCompVis())
    sigmas = sampling.get_sigmas_karras(n=steps, sigma_min=model.sigmas[0].item(), sigma_max=model.sigmas[-1].item())
    t_enc = t_enc_of(strength, steps)
    sigma_sched = sigmas[steps - t_enc - 1:]
    assert len(sigma_sched) == t_enc + 2
    xi = init + noise * sigma_sched[0]
    fn = {"Euler": sampling.sample_euler, "DPM++ 2M": sampling.sample_dpmpp_2m}[sampler]
    with torch.no_grad():
        return fn(model, xi, sigma_sched, disable=True)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_reference_kdiffusion_from_a_zero_init_at_full_strength_is_txt2img(kd, engine, pipe, context, sampler):
    """At t_enc = steps - 1 the slice is the whole schedule and xi = init + noise * sigma_max: from
    a zero init latent that is sdterm's text-to-image render (checks the reference itself)."""
    steps = 8
    txt, _ = render(engine, steps=steps, sampler=sampler, schedule="Karras")
    ref = kdiff_img2img(kd, pipe, context, torch.zeros(1, 4, SIZE // 8, SIZE // 8), seed_noise(), steps, 0.999, sampler)
    assert_close(txt.latents, ref)


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def test_encoder_module_is_diffusers_posterior_mean(engine, pipe, init_paths):
    for path in init_paths:
        image = prepare_init_image(path, SIZE, SIZE).tensor
        with torch.no_grad():
            ours = engine.models.module("vae_encoder")(image)
        dist = pipe.vae.encode(image).latent_dist
        assert_close(ours, dist.mean * 0.18215)
        assert rel_error(dist.sample(torch.Generator().manual_seed(0)) * 0.18215, dist.mean * 0.18215) > 1e-3


def test_render_starts_from_the_posterior_mean(engine, pipe, init_paths):
    """t_enc 0 (strength 0.04 of 20 steps): no update, so the result is sqrt(a) init + sqrt(1-a) noise
    with a = alphas_cumprod[1]; the init latent recovered from it is diffusers' mean * 0.18215."""
    a = float(acp()[1])
    for path in init_paths:
        result, calls = render(engine, init_image=path, strength=0.04)
        assert calls == []
        recovered = (result.latents - (1 - a) ** 0.5 * seed_noise()) / a**0.5
        assert_close(recovered, diffusers_init_latent(pipe, path))


# --------------------------------------------------------------------------------------------
# DDIM against diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,strength", DDIM_CASES)
def test_ddim_matches_diffusers_noised_at_compvis_level(engine, pipe, context, init_paths, monkeypatch, steps, strength):
    """(b) diffusers with add_noise one stride up == sdterm: latents within 1e-4, image within one level."""
    t_enc = t_enc_of(strength, steps)
    result, calls = render(engine, steps=steps, init_image=init_paths[0], strength=strength)
    init, noise = diffusers_init_latent(pipe, init_paths[0]), seed_noise()
    theirs, _ = run_diffusers(pipe, monkeypatch, context, init, noise, steps, strength, compvis_level=True)
    assert len(calls) == t_enc
    stride = 1000 // steps
    assert [int(c[1].reshape(-1)[0]) for c in calls] == [k * stride + 1 for k in reversed(range(t_enc))]
    assert_close(result.latents, theirs)
    ours_px = np.asarray(result.image, dtype=np.int16)
    assert np.abs(ours_px - diffusers_image(pipe, theirs)).max() <= 1


@pytest.mark.parametrize("steps,strength", [(20, 0.6), (14, 0.3)])
def test_ddim_eta_noise_continues_the_seeds_generator(engine, pipe, context, init_paths, monkeypatch, steps, strength):
    """eta 0.7: each update's noise is the seed generator's next draw after the starting noise (A1111's
    TorchHijack order, as in txt2img); diffusers at CompVis's level fed those draws agrees."""
    eta = 0.7
    result, _ = render(engine, steps=steps, init_image=init_paths[0], strength=strength, eta=eta)
    rng = ImageRNG(SEED, SIZE, SIZE)
    noise = rng.first()
    theirs, _ = run_diffusers(pipe, monkeypatch, context, diffusers_init_latent(pipe, init_paths[0]), noise, steps,
                              strength, compvis_level=True, eta=eta, step_noise=rng.next)
    assert_close(result.latents, theirs)
    deterministic, _ = render(engine, steps=steps, init_image=init_paths[0], strength=strength)
    assert rel_error(result.latents, deterministic.latents) > 1e-2


@pytest.mark.parametrize("steps,strength", DDIM_CASES)
def test_ddim_is_not_diffusers_unpatched(engine, pipe, context, init_paths, monkeypatch, steps, strength):
    """(a) The A1111/CompVis vs diffusers difference: diffusers noises to the first timestep it
    denoises ((t_enc - 1) * stride + 1); sdterm one stride higher (t_enc * stride + 1)."""
    t_enc = t_enc_of(strength, steps)
    stride = 1000 // steps
    result, calls = render(engine, steps=steps, init_image=init_paths[0], strength=strength)
    init, noise = diffusers_init_latent(pipe, init_paths[0]), seed_noise()
    theirs, level = run_diffusers(pipe, monkeypatch, context, init, noise, steps, strength, compvis_level=False)
    assert level == (t_enc - 1) * stride + 1
    assert rel_error(result.latents, theirs) > 1e-2
    # sdterm's first U-Net input is the init noised at the CompVis level, not at diffusers'.
    ac = acp()
    start = calls[0][0][:1]
    for lvl, same in ((t_enc * stride + 1, True), (level, False)):
        a = float(ac[lvl])
        expected = a**0.5 * init + (1 - a) ** 0.5 * noise
        assert (rel_error(start, expected) < REL_TOL) == same, lvl


# --------------------------------------------------------------------------------------------
# k-diffusion samplers against k-diffusion
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
@pytest.mark.parametrize("steps,strength", [(20, 0.6), (20, 0.3), (12, 0.95), (20, 0.04)])
def test_k_sampler_img2img_matches_kdiffusion(kd, engine, pipe, context, init_paths, sampler, steps, strength):
    result, calls = render(engine, steps=steps, init_image=init_paths[1], strength=strength, sampler=sampler,
                           schedule="Karras")
    t_enc = t_enc_of(strength, steps)
    assert len(calls) == t_enc + 1  # t_enc + 1 first-order steps over sigmas[steps - t_enc - 1:]
    ref = kdiff_img2img(kd, pipe, context, diffusers_init_latent(pipe, init_paths[1]), seed_noise(), steps,
                        strength, sampler)
    assert_close(result.latents, ref)


# --------------------------------------------------------------------------------------------
# Strength edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_strength_one_is_capped_at_0999(kd, engine, pipe, context, init_paths, monkeypatch, sampler):
    """Strength 1.0 is A1111's 0.999: t_enc = steps - 1 (19 of 20), the same render bit for bit,
    and the references at 0.999 (DDIM: 19 updates from 901, noised at 951; Euler: 20 steps over
    the whole schedule from init + noise * sigma_max)."""
    steps, stride = 20, 50
    kw = {"init_image": init_paths[0], "sampler": sampler, "schedule": "Karras" if sampler == "Euler" else "Automatic"}
    one, calls = render(engine, strength=1.0, **kw)
    capped, _ = render(engine, strength=0.999, **kw)
    assert torch.equal(one.latents, capped.latents)
    init, noise = diffusers_init_latent(pipe, init_paths[0]), seed_noise()
    if sampler == "DDIM":
        assert len(calls) == steps - 1 and int(calls[0][1].reshape(-1)[0]) == (steps - 2) * stride + 1
        theirs, level = run_diffusers(pipe, monkeypatch, context, init, noise, steps, 0.999, compvis_level=True)
        assert level == (steps - 1) * stride + 1
    else:
        assert len(calls) == steps
        theirs = kdiff_img2img(kd, pipe, context, init, noise, steps, 0.999, sampler)
    assert_close(one.latents, theirs)


@pytest.mark.parametrize("strength", [0.0, 0.04])
def test_t_enc_zero_returns_the_noised_init(engine, pipe, init_paths, strength):
    result, calls = render(engine, init_image=init_paths[0], strength=strength)
    assert calls == []
    a = float(acp()[1])  # ddim_timesteps[0]
    init = diffusers_init_latent(pipe, init_paths[0])
    assert_close(result.latents, a**0.5 * init + (1 - a) ** 0.5 * seed_noise())


def test_the_seed_noise_is_drawn_first_whatever_the_init_image(engine, pipe, init_paths):
    """Same seed, two init images: the noised start (sdterm's first U-Net input) holds the same
    noise, the seed's first draw (as txt2img's x_T)."""
    steps, strength = 20, 0.6
    a = float(acp()[t_enc_of(strength, steps) * 50 + 1])
    recovered = []
    for path in init_paths:
        _, calls = render(engine, steps=steps, init_image=path, strength=strength)
        start = calls[0][0][:1]
        init = diffusers_init_latent(pipe, path)
        recovered.append((start - a**0.5 * init) / (1 - a) ** 0.5)
    assert_close(recovered[0], seed_noise())
    assert_close(recovered[1], seed_noise())
    assert rel_error(diffusers_init_latent(pipe, init_paths[0]), diffusers_init_latent(pipe, init_paths[1])) > 0.1
    other = ImageRNG(SEED + 1, SIZE, SIZE).first()
    assert rel_error(recovered[0], other) > 0.5
