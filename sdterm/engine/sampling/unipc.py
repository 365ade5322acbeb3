"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models") as AUTOMATIC1111 runs it with its default options: variant "bh1" (B(h) = h),
skip type "time_uniform", order 3, lower order at the final steps, data prediction (x0), multistep.

The model's 1000 discrete steps become continuous time t_n = (n + 1) / 1000 with log alpha_t (alpha
= sqrt(alphas_cumprod)) interpolated linearly in t between them (the "discrete" VP noise schedule of
DPM-Solver/UniPC), sigma_t = sqrt(1 - alpha_t^2), lambda_t = log(alpha_t / sigma_t). The sampler
walks ``steps`` equal steps in t from 1 to 1/1000 and asks the model at timestep ``(t - 1/1000) *
1000`` (999 ... 0 evenly, so mostly fractional). Each step: a predictor of the given order from the
kept x0 estimates, then (all but the last step) the model at the predicted point, which is both the
corrector's input (the step is redone with it) and the newest kept estimate. ``steps`` model
calls in all, one per step as :func:`run` arranges them.

A1111 v1.6+ runs ``len(range(0, 1000, 1000 // steps))`` UniPC steps, which is ``steps`` whenever
``steps`` divides 1000 but more otherwise (30 -> 31, 300 -> 334; :func:`webui_steps`); A1111 up to
v1.5 ran ``steps`` (but 4 for 3, 10 for 9, 28 for 27: its ``adjust_steps_if_invalid``). This
function runs ``ctx.steps``. A1111 refuses fewer steps than the order (v1.5 raised them to 3);
here the order drops to the step count.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import SamplingContext
from .ddim import alphas_cumprod

ORDER = 3
"""A1111's ``uni_pc_order`` default."""
LOWER_ORDER_FINAL = True
"""A1111's ``uni_pc_lower_order_final`` default: order min(order, steps left) near the end."""


def webui_steps(steps: int, num_train_timesteps: int = 1000) -> int:
    """The UniPC steps A1111 v1.6+ runs when asked for ``steps``: the length of its timestep list."""
    return len(range(0, num_train_timesteps, num_train_timesteps // steps))


class NoiseSchedule:
    """The discrete VP schedule over continuous t in [1/N, 1], in float64."""

    def __init__(self, ac: torch.Tensor):
        self.n = ac.shape[0]
        self.log_alpha = (0.5 * torch.log(ac)).tolist()

    def log_alpha_at(self, t: float) -> float:
        """log alpha_t, piecewise linear in t through (k + 1) / N -> 0.5 log alphas_cumprod[k]."""
        pos = t * self.n - 1.0  # fractional index into alphas_cumprod
        k = min(max(math.floor(pos), 0), self.n - 2)
        la = self.log_alpha
        return la[k] + (pos - k) * (la[k + 1] - la[k])

    def alpha_sigma_lambda(self, t: float) -> tuple[float, float, float]:
        la = self.log_alpha_at(t)
        sigma = math.sqrt(1.0 - math.exp(2.0 * la))
        return math.exp(la), sigma, la - math.log(sigma)

    def model_time(self, t: float) -> float:
        """The model's timestep for continuous t: (t - 1/N) * 1000."""
        return (t - 1.0 / self.n) * 1000.0


def time_uniform(n_train: int, steps: int) -> list[float]:
    """``steps + 1`` times, evenly spaced from 1 down to 1/N (A1111's "time_uniform")."""
    t_end = 1.0 / n_train
    return [1.0 + (t_end - 1.0) * i / steps for i in range(steps + 1)]


def _coefficients(order: int, rks: list[float], hh: float) -> tuple[list[float] | None, list[float]]:
    """rhos for the predictor (None without history) and the corrector of UniPC-bh1 at ``order``."""
    h_phi_k = math.expm1(hh) / hh - 1.0
    b_h = hh  # bh1
    factorial = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R_ = np.array(R, dtype=np.float64)
    b_ = np.array(b, dtype=np.float64)
    rhos_p = None
    if order >= 2:
        rhos_p = [0.5] if order == 2 else np.linalg.solve(R_[:-1, :-1], b_[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else np.linalg.solve(R_, b_).tolist()
    return rhos_p, rhos_c


def _update(ns: NoiseSchedule, x: torch.Tensor, x0s: list[torch.Tensor], kept: list[float], t: float,
            order: int, model_t: torch.Tensor | None = None) -> torch.Tensor:
    """One UniPC-bh1 step of ``order`` from x at ``kept[-1]`` to ``t`` over the kept x0 estimates:
    the predictor, or with ``model_t`` (the x0 estimate at the predicted point) the corrector."""
    alpha_t, sigma_t, lam_t = ns.alpha_sigma_lambda(t)
    _, sigma_0, lam_0 = ns.alpha_sigma_lambda(kept[-1])
    m0 = x0s[-1]
    h = lam_t - lam_0
    rks, d1s = [], []
    for j in range(1, order):
        rk = (ns.alpha_sigma_lambda(kept[-(j + 1)])[2] - lam_0) / h
        rks.append(rk)
        d1s.append((x0s[-(j + 1)] - m0) / rk)
    rks.append(1.0)
    hh = -h  # data prediction
    rhos_p, rhos_c = _coefficients(order, rks, hh)
    b_h = hh  # bh1
    base = (sigma_t / sigma_0) * x - (alpha_t * math.expm1(hh)) * m0
    if model_t is None:
        if not d1s:
            return base
        return base - (alpha_t * b_h) * sum(r * d for r, d in zip(rhos_p, d1s))
    corr = rhos_c[-1] * (model_t - m0)
    for r, d in zip(rhos_c[:-1], d1s):
        corr = corr + r * d
    return base - (alpha_t * b_h) * corr


def run(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """UniPC over ``ctx.steps`` steps; ``steps`` model calls, one per step: step i asks the model
    at its starting point (t_i), corrects the previous step with it, then predicts x at t_{i+1}
    (diffusers' arrangement; the same arithmetic as A1111's). ``x``: the starting noise at unit
    variance, used as it is (x at t = 1). The carry holds the kept x0 estimates ("x0s"), their
    times ("times"), and the previous step's start and order ("last", "order") for its corrector."""
    ns = NoiseSchedule(alphas_cumprod(ctx.model))
    steps = ctx.steps
    times = time_uniform(ns.n, steps)
    if ctx.init is not None:  # img2img, CompVis's form (as DDIM): noised one step above, the last t_enc steps
        first = steps - ctx.t_enc
        if not ctx.resume():
            alpha, sigma, _ = ns.alpha_sigma_lambda(times[first - 1])
            x = alpha * ctx.init + sigma * x
        times, steps = times[first:], ctx.t_enc
    order = min(ORDER, steps)

    start = ctx.resume()
    x0s: list[torch.Tensor] = []
    kept: list[float] = []
    last: torch.Tensor | None = None
    last_order = 0
    if start > 0:
        x, last, last_order = ctx.carry["x"], ctx.carry["last"], ctx.carry["order"]
        x0s, kept = list(ctx.carry["x0s"]), list(ctx.carry["times"])

    for i in range(start, steps):
        t = times[i]
        alpha, sigma, _ = ns.alpha_sigma_lambda(t)
        model_t = (x - sigma * ctx.eps(x, ns.model_time(t))) / alpha  # data prediction at t_i
        if last is not None:  # corrector of step i - 1, with the estimate at its predicted point
            x = _update(ns, last, x0s, kept, t, last_order, model_t)
        x0s = (x0s + [model_t])[-order:]
        kept = (kept + [t])[-order:]
        if i < order - 1:  # warm-up: as many previous estimates as there are
            step_order = i + 1
        else:
            step_order = min(order, steps - i) if LOWER_ORDER_FINAL else order
        last, last_order = x, step_order
        x = _update(ns, x, x0s, kept, times[i + 1], step_order)  # predictor; no corrector after the last
        ctx.step_done(i, ns.model_time(t), x, x0s=list(x0s), times=list(kept), last=last, order=last_order)
    return x
