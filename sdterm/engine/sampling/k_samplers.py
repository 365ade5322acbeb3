"""The k-diffusion samplers AUTOMATIC1111 offers, as plain functions over a sampling context.

Each is k-diffusion's ``sampling.py`` function with A1111's arguments (s_churn 0, s_noise 1, eta =
the ancestral eta, LMS order 4, DPM++ 2M SDE's midpoint solver), written as one step of a shared
loop (:func:`_run`): the loop builds the sigmas (``schedules.sigmas_for``) and the denoiser
(``kdiffusion.denoiser``), scales the unit starting noise by the first sigma, and after every step
records the state a retry resumes from (``ctx.step_done``: x and a multistep sampler's history), so
an interrupted render resumed from ``ctx.carry`` ends exactly where an uninterrupted one does.

Scalars stay 0-dim tensors of the sigmas' dtype (float32) and every expression keeps
k-diffusion's order of operations, so the results agree with k-diffusion's to rounding.

Noise: the ancestral samplers (Euler a, DPM2 a, DPM++ 2S a) draw ``ctx.noise()`` exactly where
k-diffusion calls its noise sampler (once per step, after the step's model calls, never on the
step to sigma 0). The SDE samplers (DPM++ SDE, 2M SDE, 3M SDE) query ``ctx.brownian(x, sigma_min,
sigma_max)`` as A1111 builds its BrownianTreeNoiseSampler (sigma_min: the smallest nonzero sigma,
sigma_max: the largest, both 0-dim tensors); without one they fall back to ``ctx.noise()`` per
query (not A1111's noise, and a retry within DPM++ SDE's step would then shift the draws).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .base import SamplingContext
from .kdiffusion import KDenoiser, denoiser
from .schedules import sigmas_for
from .img2img import sigma_start

Step = Callable[[KDenoiser, torch.Tensor, int, torch.Tensor, dict], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _run(ctx: SamplingContext, x: torch.Tensor, step: Step, **history: Any) -> torch.Tensor:
    """The per-step loop every sampler here shares: ``step(model, sigmas, i, x, state) -> x`` for
    each i, ``state`` starting as ``history`` (or the carried state when resuming) and updated by
    the step in place; after each step ``ctx.step_done`` records x and the state."""
    sigmas = sigmas_for(ctx)
    if ctx.init is not None:  # img2img: A1111's slice of the schedule (.img2img)
        sigmas = sigmas[sigma_start(ctx.steps, ctx.t_enc):]
    model = denoiser(ctx)
    start = ctx.resume()
    if start:
        x = ctx.carry["x"]
        # A fork into this sampler from another one carries the latent alone: its history starts afresh.
        state = {k: ctx.carry.get(k, v) for k, v in history.items()}
    else:
        x = x * sigmas[0] if ctx.init is None else ctx.init + x * sigmas[0]
        state = dict(history)
    for i in range(start, len(sigmas) - 1):
        x = step(model, sigmas, i, x, state)
        ctx.step_done(i, float(sigmas[i]), x, **state)
    return x


def _eta(ctx: SamplingContext) -> float:
    return float(getattr(ctx, "eta_ancestral", 1.0))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative dx/dsigma from a denoised estimate."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up): the noise level a deterministic step goes down to, and the noise
    added back so the total is sigma_to (eta scales how much of the step is stochastic)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _ancestral_noise(ctx: SamplingContext) -> NoiseSampler:
    if ctx.noise is None:
        raise ValueError(f"{ctx.info.name if ctx.info else 'this sampler'} needs ctx.noise")
    return lambda sigma, sigma_next: ctx.noise()


def _brownian_noise(ctx: SamplingContext, x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSampler:
    if ctx.brownian is not None:
        sigmas = sigmas_for(ctx)  # the whole schedule's range, also for img2img's slice (as A1111)
        return ctx.brownian(x, sigmas[sigmas > 0].min(), sigmas.max())
    return _ancestral_noise(ctx)


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


# -- first order ---------------------------------------------------------------------------------


def sample_euler(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """Euler steps along the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        return x + d * (sigmas[i + 1] - sigmas[i])

    return _run(ctx, x, step)


def sample_euler_ancestral(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """Euler step down to sigma_down, then fresh noise up to the next sigma."""
    eta, noise = _eta(ctx), _ancestral_noise(ctx)

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        return x

    return _run(ctx, x, step)


# -- second order (two model calls a step, one on the step to 0) ----------------------------------


def sample_heun(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2 without churn); Euler on the step to 0."""

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
        return x + (d + d_2) / 2 * dt

    return _run(ctx, x, step)


def _dpm_2_step(model, x, d, sigma, sigma_to):
    """DPM-Solver-2: an Euler half-step (in log sigma) to the midpoint, its slope for the whole step."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def sample_dpm_2(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2 steps (k-diffusion's "DPM2"); Euler on the step to 0."""

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            return x + d * (sigmas[i + 1] - sigmas[i])
        return _dpm_2_step(model, x, d, sigmas[i], sigmas[i + 1])

    return _run(ctx, x, step)


def sample_dpm_2_ancestral(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver-2 down to sigma_down, then fresh noise up to the next sigma."""
    eta, noise = _eta(ctx), _ancestral_noise(ctx)

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            return x + d * (sigma_down - sigmas[i])
        x = _dpm_2_step(model, x, d, sigmas[i], sigma_down)
        return x + noise(sigmas[i], sigmas[i + 1]) * sigma_up

    return _run(ctx, x, step)


def sample_dpmpp_2s_ancestral(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2S) down to sigma_down, then fresh noise up to the next sigma."""
    eta, noise = _eta(ctx), _ancestral_noise(ctx)

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s))
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        return x

    return _run(ctx, x, step)


def sample_dpmpp_sde(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++ (stochastic), r = 1/2: two Brownian-noised half steps in log sigma."""
    eta, r = _eta(ctx), 1 / 2
    noise: list[NoiseSampler] = []

    def step(model, sigmas, i, x, state):
        if not noise:
            noise.append(_brownian_noise(ctx, x, sigmas))
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            return x + d * (sigmas[i + 1] - sigmas[i])
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise[0](_sigma_fn(t), _sigma_fn(s)) * su
        denoised_2 = model(x_2, _sigma_fn(s))
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        return x + noise[0](_sigma_fn(t), _sigma_fn(t_next)) * su

    return _run(ctx, x, step)


# -- multistep (one model call a step, history carried) -------------------------------------------


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """The integral over [t[i], t[i+1]] of the Lagrange basis polynomial of node t[i-j] over the
    nodes t[i], ..., t[i-order+1]: exact (3-point Gauss-Legendre integrates degree <= 5; the order
    is at most 4, so degree 3)."""
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    a, b = t[i], t[i + 1]
    mid, half = (a + b) / 2, (b - a) / 2
    node = math.sqrt(3 / 5)
    return half * (5 / 9 * basis(mid - half * node) + 8 / 9 * basis(mid) + 5 / 9 * basis(mid + half * node))


def sample_lms(ctx: SamplingContext, x: torch.Tensor, order: int = 4) -> torch.Tensor:
    """Linear multistep (order 4): the last ``order`` derivatives, integrated by their Lagrange
    polynomial in sigma."""

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        ds = (*state["ds"], to_d(x, sigmas[i], denoised))[-order:]
        state["ds"] = ds
        cur_order = min(i + 1, order)
        ts = [float(s) for s in sigmas]
        coeffs = [lms_coefficient(cur_order, ts, i, j) for j in range(cur_order)]
        return x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))

    return _run(ctx, x, step, ds=())


def sample_dpmpp_2m(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M): second order from the previous step's denoised estimate."""

    def step(model, sigmas, i, x, state):
        denoised = model(x, sigmas[i])
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        old = state["old_denoised"]
        if old is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        state["old_denoised"] = denoised
        return x

    return _run(ctx, x, step, old_denoised=None)


def sample_dpmpp_2m_sde(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint solver (A1111's "DPM++ 2M SDE")."""
    eta = _eta(ctx)
    noise: list[NoiseSampler] = []

    def step(model, sigmas, i, x, state):
        if not noise:
            noise.append(_brownian_noise(ctx, x, sigmas))
        denoised = model(x, sigmas[i])
        h = state["h_last"]  # k-diffusion keeps the last h through the final (denoising) step
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            old = state["old_denoised"]
            if old is not None:
                r = state["h_last"] / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old)
            if eta:
                x = x + noise[0](sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
        state["old_denoised"], state["h_last"] = denoised, h
        return x

    return _run(ctx, x, step, old_denoised=None, h_last=None)


def sample_dpmpp_3m_sde(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third order from the last two denoised estimates."""
    eta = _eta(ctx)
    noise: list[NoiseSampler] = []

    def step(model, sigmas, i, x, state):
        if not noise:
            noise.append(_brownian_noise(ctx, x, sigmas))
        denoised = model(x, sigmas[i])
        denoised_1, denoised_2, h_1, h_2 = state["denoised_1"], state["denoised_2"], state["h_1"], state["h_2"]
        h = h_1
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise[0](sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        state.update(denoised_1=denoised, denoised_2=denoised_1, h_1=h, h_2=h_1)
        return x

    return _run(ctx, x, step, denoised_1=None, denoised_2=None, h_1=None, h_2=None)
