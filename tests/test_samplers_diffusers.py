"""PLMS, UniPC and LCM against diffusers' schedulers (references nobody here wrote), on a tiny
deterministic eps-model: a fixed nonlinear function of (x, t).

PLMS is compared with ``PNDMScheduler(skip_prk_steps=True)`` in SD v1's configuration ("leading"
spacing, steps_offset 1, set_alpha_to_one False), which runs the same timesteps. UniPC is compared
with ``UniPCMultistepScheduler`` (bh1, data prediction, order 3, lower_order_final,
final_sigmas_type "sigma_min"): its "linspace" timesteps are A1111's ``time_uniform`` ones when
they are whole numbers (999 / steps whole), and for other step counts A1111's fractional times and
their interpolated sigmas are put into the scheduler. LCM is compared with ``LCMScheduler``
(original_inference_steps 50) given A1111's timesteps and the same noise, at the step counts where
A1111's interpolated sigmas fall on the 50 original timesteps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdterm.config import ScheduleConfig
from sdterm.engine.sampling import lcm, plms, unipc
from sdterm.engine.sampling.base import SamplingContext
from sdterm.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (1, 4, 8, 8)


def tiny_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A small fixed nonlinear eps-model: depends on x (with a spatial mix) and on t (fractional t
    is fine)."""
    t = float(t)
    s = t / 1000.0
    mix = torch.roll(x, 1, dims=-1) - 0.5 * torch.roll(x, 1, dims=-2)
    return 0.8 * torch.tanh((0.6 + s) * x) + 0.25 * torch.sin(3.0 * s + mix) + 0.05 * s * x


def start_noise(dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def noise_list(n: int, dtype=torch.float64, seed=1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


class Counter:
    def __init__(self):
        self.calls = 0
        self.ts: list[float] = []

    def __call__(self, x, t):
        self.calls += 1
        self.ts.append(float(t))
        return tiny_eps(x, t)


def make_ctx(name: str, steps: int, eps=tiny_eps, noises=None, on_step=None, carry=None) -> SamplingContext:
    it = iter(noises or [])
    return SamplingContext(eps=eps, model=ScheduleConfig(), steps=steps, schedule="Uniform",
                           noise=lambda: next(it), on_step=on_step, carry={} if carry is None else carry,
                           info=SAMPLERS[name])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ac64() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


# ------------------------------------------------------------------------------------------------
# PLMS
# ------------------------------------------------------------------------------------------------


def pndm(steps: int, dtype):
    s = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                                timestep_spacing="leading")
    s.set_timesteps(steps)
    if dtype == torch.float64:  # diffusers keeps alphas in fp32; give it the fp64 schedule
        s.alphas_cumprod = ac64()
        s.final_alpha_cumprod = s.alphas_cumprod[0]
    return s


def diffusers_plms(steps: int, x: torch.Tensor, dtype, trace: list | None = None) -> torch.Tensor:
    s = pndm(steps, dtype)
    sample = x
    for t in s.timesteps:
        sample = s.step(tiny_eps(sample, int(t)), t, sample).prev_sample
        if trace is not None and s.counter != 1:  # counter 1: the look-ahead, no update yet
            trace.append(sample)
    return sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 25, 50])
def test_plms_matches_diffusers_pndm(steps, dtype):
    x = start_noise(dtype)
    ref = diffusers_plms(steps, x, dtype)
    ours = plms.run(make_ctx("PLMS", steps), x)
    assert ours.dtype == dtype
    assert rel(ours, ref) < TOL[dtype], rel(ours, ref)


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 10, 25, 50])
def test_plms_timesteps_are_diffusers_and_a1111s(steps):
    s = pndm(steps, torch.float32)
    expected = sorted({int(t) for t in s.timesteps}, reverse=True)
    assert plms.plms_timesteps(1000, steps) == expected
    # A1111 (CompVis make_ddim_timesteps "uniform", and v1.6+ get_timesteps): range(0, 1000, 1000 // steps) + 1
    a1111 = list(np.clip(np.arange(0, 1000, 1000 // steps) + 1, 0, 999))
    assert plms.webui_timesteps(1000, steps) == a1111
    if 1000 % steps == 0:
        assert plms.plms_timesteps(1000, steps)[::-1] == a1111


@pytest.mark.parametrize("steps", [2, 4, 10, 25, 50])
def test_plms_webui_form_is_one_update_short(steps):
    """A1111 v1.6+ PLMS at ``steps`` (dividing 1000) = diffusers' PNDM trajectory after steps - 1 updates."""
    x = start_noise()
    trace: list[torch.Tensor] = []
    diffusers_plms(steps, x, torch.float64, trace)
    ours = plms.run_webui(make_ctx("PLMS", steps), x)
    assert rel(ours, trace[steps - 2]) < 1e-9


# ------------------------------------------------------------------------------------------------
# call counts and resume (all three)
# ------------------------------------------------------------------------------------------------

RUNS = {"PLMS": plms.run, "UniPC": unipc.run, "LCM": lcm.run}


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 25])
def test_model_calls_match_registry(name, steps):
    counter = Counter()
    RUNS[name](make_ctx(name, steps, eps=counter, noises=noise_list(steps)), start_noise())
    assert counter.calls == SAMPLERS[name].calls(steps)


class Stop(Exception):
    pass


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("steps,k", [(10, 0), (10, 1), (10, 2), (10, 3), (10, 6), (10, 8), (4, 1), (3, 1)])
def test_resume_after_a_failed_step_is_bit_identical(name, steps, k):
    x = start_noise(torch.float32)
    full = RUNS[name](make_ctx(name, steps, noises=noise_list(steps, torch.float32)), x)

    def fail_after(i, t, latent):
        if i == k:
            raise Stop

    carry: dict = {}
    noises = noise_list(steps, torch.float32)
    it = iter(noises)  # one noise stream across both attempts, as the engine's is
    ctx = make_ctx(name, steps, on_step=fail_after, carry=carry)
    ctx.noise = lambda: next(it)
    with pytest.raises(Stop):
        RUNS[name](ctx, x)
    assert carry["step"] == k + 1
    counter = Counter()
    ctx2 = make_ctx(name, steps, eps=counter, carry=carry)
    ctx2.noise = lambda: next(it)
    resumed = RUNS[name](ctx2, torch.full_like(x, float("nan")))  # x is ignored on resume
    assert torch.equal(resumed, full)
    assert counter.calls == SAMPLERS[name].calls(steps, start=k + 1)
