"""sdterm's own U-Net, VAE decoder and DDIM sampler against diffusers, on identical weights.

The tiny demo architecture (``demo_config``) gets the demo model's random weights from
``demo_modules`` (peaked cross-attention, a unit-scale noise estimate: an error in the attention
or the U-Net shows in the trajectory instead of drowning in x_T); those weights are exported
under the original single-file keys (``original_state_dict``) and mapped to diffusers names with
diffusers' own converters, so the key mapping under test is diffusers', not ours. Everything
runs in fp32 on the CPU and must agree within 1e-4 relative error.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from sdterm.config import ScheduleConfig  # noqa: E402
from sdterm.engine.sampling import ddim, guidance  # noqa: E402
from sdterm.engine.loading.checkpoint import UNET_PREFIX, VAE_PREFIX# noqa: E402
from sdterm.engine.loading.demo import demo_config, demo_modules, original_state_dict# noqa: E402
from sdterm.bench.reference import diffusers_unet_kwargs, diffusers_vae_kwargs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4
CFG_SCALE = 7.5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel_tol: float = REL_TOL) -> None:
    """Relative L2 error below ``rel_tol`` and the largest element error small against the scale."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = expected.norm()
    assert scale > 0
    rel = float((actual - expected).norm() / scale)
    max_abs = float((actual - expected).abs().max())
    peak = float(expected.abs().max())
    assert rel < rel_tol, f"relative error {rel:.3e} >= {rel_tol:g} (max abs diff {max_abs:.3e}, peak {peak:.3e})"
    assert max_abs <= rel_tol * peak, f"max abs diff {max_abs:.3e} > {rel_tol:g} * peak {peak:.3e}"


# --------------------------------------------------------------------------------------------
# Models (built once per module: a couple of seconds on the CPU)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return demo_config(vocab_size=1000)


@pytest.fixture(scope="module")
def modules(cfg):
    text, unet, vae = demo_modules(cfg, torch.float32, seed=1234)
    return text, unet.eval(), vae.eval()


@pytest.fixture(scope="module")
def checkpoint(modules):
    return original_state_dict(*modules)


@pytest.fixture(scope="module")
def diffusers_unet(cfg, checkpoint):
    u = cfg.unet
    assert u.channel_mult == (1, 2) and u.attention_resolutions == (1,) and u.transformer_depth == 1
    model = UNet2DConditionModel(**{**diffusers_unet_kwargs(u), "sample_size": 8})  # 8x8 latents, not SD v1's 64
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(model.config))
    n_ldm = sum(k.startswith(UNET_PREFIX) for k in checkpoint)
    assert len(converted) == n_ldm, "the converter dropped or duplicated U-Net keys"
    model.load_state_dict(converted, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def diffusers_vae(cfg, checkpoint):
    torch.manual_seed(99)  # the encoder/quant_conv keep diffusers' own random init; unused by decode
    model = AutoencoderKL(**{**diffusers_vae_kwargs(cfg.vae), "sample_size": 64})  # the tiny images, not 512
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(model.config))
    n_ldm = sum(k.startswith(VAE_PREFIX) for k in checkpoint)
    assert len(converted) == n_ldm, "the converter dropped or duplicated VAE keys"
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected, unexpected
    # Only the encoder side may be missing (sdterm builds no encoder) ...
    assert all(k.startswith(("encoder.", "quant_conv.")) for k in missing), missing
    # ... and every decoder-side parameter was loaded from the checkpoint.
    decode_side = {k for k in model.state_dict() if k.startswith(("decoder.", "post_quant_conv."))}
    assert decode_side == set(converted), decode_side ^ set(converted)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# 1. U-Net
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,timesteps",
    [((2, 4, 8, 8), [999, 1]), ((1, 4, 8, 16), [500]), ((2, 4, 16, 8), [981, 21])],
)
def test_unet_matches_diffusers(modules, diffusers_unet, shape, timesteps):
    _, unet, _ = modules
    gen = torch.Generator("cpu").manual_seed(7)
    x = torch.randn(shape, generator=gen)
    ctx = torch.randn((shape[0], 77, 32), generator=gen)
    t = torch.tensor(timesteps, dtype=torch.long)

    ours = unet(x, t, ctx)
    theirs = diffusers_unet(x, t, encoder_hidden_states=ctx).sample
    assert ours.abs().max() > 1e-3  # not trivially zero
    assert_close(ours, theirs)


def test_unet_is_batch_consistent(modules):
    """Each batch entry depends only on its own x, t and context (guidance relies on this)."""
    _, unet, _ = modules
    gen = torch.Generator("cpu").manual_seed(8)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    ctx = torch.randn((2, 77, 32), generator=gen)
    t = torch.tensor([700, 300])
    both = unet(x, t, ctx)
    for i in range(2):
        assert_close(both[i : i + 1], unet(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]))


# --------------------------------------------------------------------------------------------
# 2. VAE decoder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 4, 4, 8)])
def test_vae_decode_matches_diffusers(modules, diffusers_vae, cfg, shape):
    _, _, vae = modules
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(3))
    ours = vae(latents)
    theirs = diffusers_vae.decode(latents / cfg.vae.scale_factor).sample
    assert ours.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert_close(ours, theirs)


# --------------------------------------------------------------------------------------------
# 3. DDIM with classifier-free guidance, whole trajectory
# --------------------------------------------------------------------------------------------


def diffusers_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_guided_trajectory_matches_diffusers(modules, diffusers_unet, eta):
    _, unet, _ = modules
    steps, seed = 10, 42
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    gen = torch.Generator("cpu").manual_seed(5)
    cond = torch.randn((1, 77, 32), generator=gen)
    uncond = torch.randn((1, 77, 32), generator=gen)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(steps)]

    # sdterm
    schedule = ddim.Schedule.make(ScheduleConfig(), steps)
    fed = iter(noises)
    calls = []

    def noise() -> torch.Tensor:
        calls.append(1)
        return next(fed)

    ours = ddim.sample(guidance.guided(unet, cond, uncond, CFG_SCALE), x_T.clone(), schedule, eta=eta, noise=noise)
    assert len(calls) == (steps if eta > 0 else 0)

    # diffusers
    sched = diffusers_scheduler()
    sched.set_timesteps(steps)
    assert [int(t) for t in sched.timesteps] == list(schedule.timesteps)
    context = torch.cat([uncond, cond])
    x = x_T.clone() * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eps_u, eps_c = diffusers_unet(inp, t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_u + CFG_SCALE * (eps_c - eps_u)
        x = sched.step(eps, t, x, eta=eta, variance_noise=noises[i] if eta > 0 else None).prev_sample
    theirs = x

    assert (ours - x_T).abs().max() > 1e-2  # the sampler actually moved
    assert_close(ours, theirs)


def test_unguided_trajectory_matches_diffusers(modules, diffusers_unet):
    """scale == 1 takes the single-pass branch of ``guided``."""
    _, unet, _ = modules
    steps = 5
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(11))
    cond = torch.randn((1, 77, 32), generator=torch.Generator("cpu").manual_seed(12))
    denoise = guidance.guided(unet, cond, torch.zeros_like(cond), 1.0)
    ours = ddim.sample(denoise, x_T.clone(), ddim.Schedule.make(ScheduleConfig(), steps))

    sched = diffusers_scheduler()
    sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps:
        eps = diffusers_unet(x, t, encoder_hidden_states=cond).sample
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    assert_close(ours, x)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_matches_diffusers(eta):
    """One update with random inputs, every step of a 25-step schedule (no network involved)."""
    steps = 25
    schedule = ddim.Schedule.make(ScheduleConfig(), steps)
    sched = diffusers_scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(21)
    for i, t in enumerate(sched.timesteps):
        x = torch.randn((1, 4, 8, 8), generator=gen)
        eps = torch.randn((1, 4, 8, 8), generator=gen)
        z = torch.randn((1, 4, 8, 8), generator=gen)
        ours = ddim.ddim_step(x, eps, schedule.alpha[i], schedule.alpha_prev[i], eta, z if eta > 0 else None)
        theirs = sched.step(eps, t, x, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        assert_close(ours, theirs, rel_tol=1e-5)


# --------------------------------------------------------------------------------------------
# 4. The schedule itself
# --------------------------------------------------------------------------------------------


def test_schedule_50_steps_is_the_compvis_one():
    cfg = ScheduleConfig()
    schedule = ddim.Schedule.make(cfg, 50)
    assert list(schedule.timesteps) == list(range(981, 0, -20))
    assert schedule.timesteps[0] == 981 and schedule.timesteps[-1] == 1 and len(schedule.timesteps) == 50

    # Independent float64 scaled-linear schedule.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    assert schedule.alpha_prev[-1] == pytest.approx(float(ac[0]), rel=0, abs=1e-12)
    assert schedule.alpha_prev[-1] == pytest.approx(1.0 - 0.00085, rel=0, abs=1e-12)
    for i, t in enumerate(schedule.timesteps):
        assert schedule.alpha[i] == pytest.approx(float(ac[t]), rel=1e-12)
    # alpha_prev is the next entry's alpha (stride 20), alpha_0 at the end.
    assert list(schedule.alpha_prev[:-1]) == list(schedule.alpha[1:])


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 30, 50, 333, 999])
def test_schedule_matches_diffusers(steps):
    schedule = ddim.Schedule.make(ScheduleConfig(), steps)
    sched = diffusers_scheduler()
    sched.set_timesteps(steps)
    assert list(schedule.timesteps) == [int(t) for t in sched.timesteps]
    ac = sched.alphas_cumprod  # float32 in diffusers; sdterm keeps float64
    stride = 1000 // steps
    for i, t in enumerate(schedule.timesteps):
        prev = t - stride
        expected_prev = ac[prev] if prev >= 0 else sched.final_alpha_cumprod
        assert schedule.alpha[i] == pytest.approx(float(ac[t]), rel=1e-6)
        assert schedule.alpha_prev[i] == pytest.approx(float(expected_prev), rel=1e-6)
