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

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
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


@pytest.mark.parametrize("steps,asked", [
    (1, []),  # one timestep, no update: A1111 v1.6+ returns the noise
    (3, [999, 667, 667, 334]),  # 1000 // 3 = 333: four timesteps (1, 334, 667, 999), three updates
    (4, [751, 501, 501, 251]),
])
def test_plms_webui_form_asks_the_model_where_a1111_does(steps, asked):
    counter = Counter()
    x = start_noise()
    out = plms.run_webui(make_ctx("PLMS", steps, eps=counter), x)
    assert counter.ts == asked
    if not asked:
        assert torch.equal(out, x)


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


# ------------------------------------------------------------------------------------------------
# UniPC
# ------------------------------------------------------------------------------------------------


def a1111_unipc_times(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """A1111's UniPC schedule, written from its description (NoiseScheduleVP "discrete" and
    get_time_steps "time_uniform"): (model timesteps of the steps + 1 points, their VE sigmas)."""
    t = np.linspace(1.0, 1e-3, steps + 1)
    log_alpha = np.interp(t, np.arange(1, 1001) / 1000.0, 0.5 * np.log(ac64().numpy()))
    alpha = np.exp(log_alpha)
    return (t - 1e-3) * 1000.0, np.sqrt(1.0 - alpha**2) / alpha


def unipc_scheduler(steps: int, dtype, a1111_times: bool):
    s = diffusers.UniPCMultistepScheduler(**SD, solver_order=3, prediction_type="epsilon", predict_x0=True,
                                          solver_type="bh1", lower_order_final=True, timestep_spacing="linspace",
                                          final_sigmas_type="sigma_min")
    s.set_timesteps(steps)
    if a1111_times:  # diffusers rounds timesteps to whole numbers; give it A1111's (fractional) ones
        model_t, sigmas = a1111_unipc_times(steps)
        s.timesteps = torch.tensor(model_t[:-1], dtype=torch.float64)
        s.sigmas = torch.tensor(sigmas, dtype=dtype)
    return s


def diffusers_unipc(steps: int, x: torch.Tensor, dtype, a1111_times: bool) -> torch.Tensor:
    s = unipc_scheduler(steps, dtype, a1111_times)
    sample = x
    for t in s.timesteps:
        sample = s.step(tiny_eps(sample, float(t)), t, sample).prev_sample
    return sample


WHOLE = [1, 3, 9, 27]
"""Step counts whose A1111 timesteps, linspace(999, 0, steps + 1), are whole numbers."""


@pytest.mark.parametrize("steps", WHOLE)
def test_unipc_matches_diffusers_unipc_as_configured(steps):
    """No help given to diffusers: its own "linspace" timesteps and sigma_min final sigma."""
    x = start_noise(torch.float32)
    s = unipc_scheduler(steps, torch.float32, a1111_times=False)
    model_t, _ = a1111_unipc_times(steps)
    np.testing.assert_allclose(s.timesteps.numpy(), model_t[:-1], atol=1e-9)
    ref = diffusers_unipc(steps, x, torch.float32, a1111_times=False)
    ours = unipc.run(make_ctx("UniPC", steps), x)
    assert rel(ours, ref) < 1e-4, rel(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 20, 25, 50])
def test_unipc_matches_diffusers_on_a1111s_timesteps(steps, dtype):
    x = start_noise(dtype)
    ref = diffusers_unipc(steps, x, dtype, a1111_times=True)
    ours = unipc.run(make_ctx("UniPC", steps), x)
    assert ours.dtype == dtype
    assert rel(ours, ref) < TOL[dtype], rel(ours, ref)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20])
def test_unipc_asks_the_model_at_a1111s_timesteps(steps):
    counter = Counter()
    unipc.run(make_ctx("UniPC", steps, eps=counter), start_noise())
    model_t, _ = a1111_unipc_times(steps)
    np.testing.assert_allclose(counter.ts, model_t[:-1], rtol=0, atol=1e-9)


def test_unipc_webui_step_counts():
    # A1111 v1.6+: steps=len(range(0, 1000, 1000 // steps))
    assert [unipc.webui_steps(n) for n in (1, 3, 10, 20, 25, 30, 50)] == [1, 4, 10, 20, 25, 31, 50]


# ------------------------------------------------------------------------------------------------
# LCM
# ------------------------------------------------------------------------------------------------


def a1111_lcm_schedule(steps: int) -> tuple[np.ndarray, list[int]]:
    """A1111's LCM sigmas (with the final 0) and the timesteps its denoiser asks the model at,
    written from its description: 50 valid timesteps 20k + 19; get_sigmas(n) = t_to_sigma of
    linspace(999, 19, n) (index (t - 19) / 20, log-sigma interpolated); sigma_to_t = nearest valid
    timestep in log-sigma."""
    valid = ac64().numpy()[np.arange(50) * 20 + 19]
    log_sigmas = np.log(np.sqrt((1 - valid) / valid))
    idx = (np.linspace(999, 19, steps) - 19) / 20
    sigmas = np.exp(np.interp(idx, np.arange(50), log_sigmas))
    ts = [int(np.abs(np.log(s) - log_sigmas).argmin()) * 20 + 19 for s in sigmas]
    return np.append(sigmas, 0.0), ts


def diffusers_lcm(steps: int, x: torch.Tensor, noises: list[torch.Tensor], dtype, monkeypatch,
                  a1111_c_skip: bool = False) -> torch.Tensor:
    from diffusers.schedulers import scheduling_lcm

    sigmas, ts = a1111_lcm_schedule(steps)
    s = diffusers.LCMScheduler(**SD, original_inference_steps=50, timestep_scaling=10.0)
    if dtype == torch.float64:
        s.alphas_cumprod = ac64()
    s.set_timesteps(timesteps=ts)
    if a1111_c_skip:  # A1111 applies c_skip to the sigma-scaled latent: sample / sqrt(alphas_cumprod[t])
        scalings = s.get_scalings_for_boundary_condition_discrete

        def a1111_scalings(t):
            c_skip, c_out = scalings(int(t))  # a Python int: diffusers' own formula, in float64
            return c_skip / float(s.alphas_cumprod[int(t)]) ** 0.5, c_out

        s.get_scalings_for_boundary_condition_discrete = a1111_scalings
    assert [int(t) for t in s.timesteps] == ts
    it = iter(noises)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: next(it))
    # A1111 starts at noise * sigma_max in its (sigma-scaled) space: x * sigma / sqrt(sigma^2 + 1) here
    sample = x * float(sigmas[0] / math.sqrt(sigmas[0] ** 2 + 1))
    for t in s.timesteps:
        sample = s.step(tiny_eps(sample, int(t)), t, sample).prev_sample
    return sample


ON_GRID = [1, 2, 8, 50]
"""Step counts whose A1111 sigmas fall on the 50 original timesteps (steps - 1 divides 49), where
diffusers (whole timesteps only) can follow."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps", ON_GRID)
def test_lcm_matches_diffusers_lcm_with_the_same_noise(steps, dtype, monkeypatch):
    x = start_noise(dtype)
    noises = noise_list(steps, dtype)
    ref = diffusers_lcm(steps, x, noises, dtype, monkeypatch)
    ours = lcm.run(make_ctx("LCM", steps, noises=noises), x)
    assert ours.dtype == dtype
    # A1111 applies c_skip to the sigma-scaled latent, diffusers to the unit-variance one: ~1e-7 apart
    assert rel(ours, ref) < (1e-4 if dtype == torch.float32 else 1e-6), rel(ours, ref)
    exact = diffusers_lcm(steps, x, noises, dtype, monkeypatch, a1111_c_skip=True)
    assert rel(ours, exact) < TOL[dtype], rel(ours, exact)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 10, 25, 50])
def test_lcm_schedule_is_a1111s(steps):
    sigmas, ts = a1111_lcm_schedule(steps)
    sched = lcm.LCMSchedule(ac64())
    np.testing.assert_allclose(sched.sigmas(steps), sigmas, rtol=1e-12)
    assert [sched.timestep(float(s)) for s in sigmas[:-1]] == ts
    counter = Counter()
    lcm.run(make_ctx("LCM", steps, eps=counter, noises=noise_list(steps)), start_noise())
    assert counter.ts == ts


def test_lcm_off_grid_noise_level_is_the_interpolated_sigma():
    """4 steps: the model is told timesteps 999, 679, 339, 19, but the latent carries noise at the
    interpolated sigmas (A1111's mismatch, kept): the model's input at step 1 is (denoised + sigma_1
    z) / sqrt(sigma_1^2 + 1) with sigma_1 between those of 659 and 679."""
    sigmas, ts = a1111_lcm_schedule(4)
    assert ts == [999, 679, 339, 19]
    seen = []

    def eps(x, t):
        seen.append(x.clone())
        return tiny_eps(x, t)

    x = start_noise()
    z = noise_list(4)
    lcm.run(make_ctx("LCM", 4, eps=eps, noises=z), x)
    s0, s1 = sigmas[0], sigmas[1]
    c_in0 = 1 / math.sqrt(s0**2 + 1)
    assert torch.allclose(seen[0], x * s0 * c_in0)
    st = 9990.0
    denoised = st / math.sqrt(st**2 + 0.25) * (x * s0 - s0 * tiny_eps(seen[0], 999)) + 0.25 / (st**2 + 0.25) * x * s0
    assert torch.allclose(seen[1], (denoised + s1 * z[0]) / math.sqrt(s1**2 + 1), rtol=1e-12, atol=1e-12)
