"""Noise schedules (A1111's "Schedule type") for the k-diffusion samplers: ``steps`` sigmas from the
model's sigma_max down, then a final 0 (KL Optimal ends at sigma_min instead, as in A1111).

Each follows AUTOMATIC1111 v1.10's ``modules/sd_schedulers.py`` and ``KDiffusionSampler.get_sigmas``:
the range is the model's own (sigma_min = its smallest discrete sigma, sigma_max its largest; A1111's
"sigma min/max" and "rho" overrides default to 0 = the model's, and sdterm has no such options),
Karras uses rho 7 and Polyexponential rho 1 (k-diffusion's defaults, A1111 passes no rho), Beta uses
alpha = beta = 0.6 (A1111's defaults), Align Your Steps the published SD 1.5 sigmas. Sigmas are
float32 on the CPU, as A1111 hands them to the sampler. A sampler flagged
``discard_next_to_last_sigma`` (DPM2, DPM2 a, DPM++ 3M SDE) gets the schedule for steps + 1 with
the next-to-last sigma dropped.

Two of A1111's schedules don't run exactly ``steps`` steps, and sdterm keeps that so images match:
"DDIM" strides 1000 // steps and yields more sigmas when steps doesn't divide 1000 (see
:func:`schedule_steps`), and "KL Optimal" has no final 0, so a sampler's last step is an ordinary
one (a second-order sampler makes two model calls on it).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...samplers import SamplerInfo
from .base import SamplingContext
from .kdiffusion import DiscreteSigmas, append_zero, discrete_sigmas

BETA_ALPHA = 0.6
BETA_BETA = 0.6
"""A1111's defaults for the Beta schedule's distribution ("beta_dist_alpha"/"beta_dist_beta")."""

AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
"""Align Your Steps' 10-step sigmas for SD 1.5 (NVIDIA's published values, as A1111 has them)."""


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log sigma a polynomial (degree rho) of the step: rho 1 is the exponential schedule."""
    ramp = torch.linspace(1, 0, n) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def _timesteps_to_sigmas(d: DiscreteSigmas, n: int, *, drop_last: bool) -> torch.Tensor:
    start, end = d.sigma_to_t(torch.tensor(d.sigma_max)), d.sigma_to_t(torch.tensor(d.sigma_min))
    ts = torch.linspace(start, end, n + 1)[:-1] if drop_last else torch.linspace(start, end, n)
    return torch.tensor([float(d.t_to_sigma(t)) for t in ts] + [0.0], dtype=torch.float32)


def sgm_uniform(n: int, d: DiscreteSigmas) -> torch.Tensor:
    """n + 1 timesteps evenly from t(sigma_max) to t(sigma_min), the last one dropped."""
    return _timesteps_to_sigmas(d, n, drop_last=True)


def normal(n: int, d: DiscreteSigmas) -> torch.Tensor:
    """n timesteps evenly from t(sigma_max) to t(sigma_min)."""
    return _timesteps_to_sigmas(d, n, drop_last=False)


def simple(n: int, d: DiscreteSigmas) -> torch.Tensor:
    """Every (1000 / n)-th discrete sigma from the top, index truncated."""
    stride = len(d.sigmas) / n
    return torch.tensor([float(d.sigmas[-(1 + int(i * stride))]) for i in range(n)] + [0.0], dtype=torch.float32)


def ddim(n: int, d: DiscreteSigmas) -> torch.Tensor:
    """The discrete sigmas at 1, 1 + s, 1 + 2s, ... (s = 1000 // n) below 1000, descending: more
    than n of them when n doesn't divide 1000 (A1111 does the same)."""
    stride = max(len(d.sigmas) // n, 1)
    sigs = [float(d.sigmas[i]) for i in range(1, len(d.sigmas), stride)]
    return torch.tensor(sigs[::-1] + [0.0], dtype=torch.float32)


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """tan of evenly spaced angles from atan(sigma_max) to atan(sigma_min): n + 1 sigmas, no 0."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    frac = torch.arange(n + 1) / n
    return torch.tan(frac * alpha_min + (1.0 - frac) * alpha_max)


def align_your_steps(n: int) -> torch.Tensor:
    """The SD 1.5 AYS sigmas, log-linearly interpolated to n when n isn't their 11 (whatever the
    model's range)."""
    if n == len(AYS_SD15):
        return torch.tensor([*AYS_SD15, 0.0], dtype=torch.float32)
    xs = np.linspace(0, 1, len(AYS_SD15))
    ys = np.log(np.array(AYS_SD15[::-1]))
    sigs = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]
    return torch.tensor(np.append(sigs, [0.0]), dtype=torch.float32)


def beta(n: int, sigma_min: float, sigma_max: float, a: float = BETA_ALPHA, b: float = BETA_BETA) -> torch.Tensor:
    """Lee et al. (2024): sigmas at the Beta(a, b) quantiles of evenly spaced levels from 1 to 0."""
    levels = 1 - np.linspace(0, 1, n)
    sigs = [sigma_min + beta_ppf(float(q), a, b) * (sigma_max - sigma_min) for q in levels]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile of q (scipy.stats.beta.ppf), by bisection to double precision."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def schedule_sigmas(name: str, steps: int, d: DiscreteSigmas) -> torch.Tensor:
    """The schedule ``name`` (an A1111 label, not "Automatic") for ``steps`` steps over ``d``."""
    lo, hi = d.sigma_min, d.sigma_max
    makers = {
        "Uniform": lambda: d.get_sigmas(steps),
        "Karras": lambda: karras(steps, lo, hi),
        "Exponential": lambda: exponential(steps, lo, hi),
        "Polyexponential": lambda: polyexponential(steps, lo, hi),
        "SGM Uniform": lambda: sgm_uniform(steps, d),
        "KL Optimal": lambda: kl_optimal(steps, lo, hi),
        "Align Your Steps": lambda: align_your_steps(steps),
        "Simple": lambda: simple(steps, d),
        "Normal": lambda: normal(steps, d),
        "DDIM": lambda: ddim(steps, d),
        "Beta": lambda: beta(steps, lo, hi),
    }
    if name not in makers:
        raise ValueError(f"unknown schedule {name!r}")
    return makers[name]()


def get_sigmas(name: str, steps: int, d: DiscreteSigmas, *, discard_next_to_last: bool = False) -> torch.Tensor:
    """A1111's ``get_sigmas``: with ``discard_next_to_last``, the schedule for steps + 1, next-to-last dropped."""
    sigmas = schedule_sigmas(name, steps + 1 if discard_next_to_last else steps, d)
    if discard_next_to_last:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def sigmas_for(ctx: SamplingContext) -> torch.Tensor:
    """The sigmas a k-diffusion sampler runs over for ``ctx`` (its resolved schedule and steps;
    "Automatic" is resolved here too, to the sampler's default, or Uniform without ``ctx.info``)."""
    discard = bool(ctx.info is not None and ctx.info.discard_next_to_last_sigma)
    name = ctx.schedule
    if name == "Automatic":
        name = ctx.info.default_schedule if ctx.info is not None else "Uniform"
    return get_sigmas(name, ctx.steps, discrete_sigmas(ctx.model), discard_next_to_last=discard)


def schedule_steps(name: str, steps: int, *, discard_next_to_last: bool = False, train_steps: int = 1000) -> int:
    """How many sampler steps the schedule really makes (``len(sigmas) - 1``): ``steps`` except for
    "DDIM" when ``steps`` (+ 1 with ``discard_next_to_last``) doesn't divide 1000."""
    if name != "DDIM":
        return steps
    n = steps + 1 if discard_next_to_last else steps
    count = len(range(1, train_steps, max(train_steps // n, 1)))
    return count - 1 if discard_next_to_last else count


def model_calls(info: SamplerInfo, schedule: str, steps: int, start: int = 0) -> int:
    """The denoiser calls a k-diffusion sampler makes with this schedule: ``info.calls`` of the
    steps the schedule really makes (:func:`schedule_steps`), except that KL Optimal ends at
    sigma_min, not 0, so a second-order sampler calls twice on its last step too. (With an
    ancestral eta above 1 a second-order ancestral step can reach sigma_down = 0 early and call
    once: not counted.) ``start``: only the steps from ``start`` on (a render resumed after a retry)."""
    if schedule == "Automatic":
        schedule = info.default_schedule
    n = schedule_steps(schedule, steps, discard_next_to_last=info.discard_next_to_last_sigma)
    if schedule == "KL Optimal" and info.second_order:
        return 2 * (n - start)
    return info.calls(n, start)


def sampler_plan(info: SamplerInfo, schedule: str, steps: int, start: int = 0,
                 t_enc: int | None = None) -> tuple[int, int]:
    """(the steps the sampler really makes, its model calls from step ``start`` on): ``steps`` and
    ``info.calls`` except where a k-diffusion schedule changes them (A1111's "DDIM" schedule strides
    1000 // steps; KL Optimal ends above 0); what the progress bar and the U-Net streamer need.
    With ``t_enc`` (img2img) only the steps an img2img render makes (:mod:`.img2img`)."""
    if t_enc is not None:
        return _img2img_plan(info, schedule, steps, start, t_enc)
    if not info.k_diffusion:
        return steps, info.calls(steps, start)
    total = schedule_steps(schedule, steps, discard_next_to_last=info.discard_next_to_last_sigma)
    return total, model_calls(info, schedule, steps, start)


def _img2img_plan(info: SamplerInfo, schedule: str, steps: int, start: int, t_enc: int) -> tuple[int, int]:
    from .img2img import plan

    if schedule == "Automatic":
        schedule = info.default_schedule
    n = schedule_steps(schedule, steps, discard_next_to_last=info.discard_next_to_last_sigma) if info.k_diffusion \
        else steps
    p = plan(info, steps, n, t_enc)
    if info.k_diffusion:
        if schedule == "KL Optimal" and info.second_order:
            return p.steps_run, 2 * (p.steps_run - start)
        return p.steps_run, info.calls(n, p.first + start)
    extra = 1 if (info.extra_first_call and start == 0 and p.steps_run > 1) else 0
    return p.steps_run, p.steps_run - start + extra
