"""LCM: latent consistency model sampling (Luo et al. 2023) as AUTOMATIC1111 (v1.8+) runs it.

A1111 treats LCM as a k-diffusion sampler over a denoiser that knows only the 50 timesteps the LCM
was distilled on (19, 39, ..., 999 for 1000 training steps):

* sigmas: ``steps`` points evenly spaced in index over those 50 (from 999 down to 19; log-sigma
  interpolated between neighbours, so a sigma can sit between two of them), then 0;
* the model is asked at the nearest of the 50 timesteps (in log-sigma) on the latent scaled to unit
  variance (x / sqrt(sigma^2 + 1));
* the consistency boundary condition with sigma_data 0.5 and timestep scaling 10:
  ``denoised = c_out * (x - sigma * eps) + c_skip * x``, c_skip = 0.25 / ((10 t)^2 + 0.25),
  c_out = 10 t / sqrt((10 t)^2 + 0.25), t that nearest timestep (x here is the sigma-scaled latent,
  as A1111 has it; diffusers applies c_skip to the unit-variance sample instead: a difference of
  order 1e-7);
* x = denoised, then + sigma_next * noise for all but the last step (one noise draw each);
* the starting latent is the unit-variance noise times the first sigma.
"""

from __future__ import annotations

import math

import torch

from .base import SamplingContext
from .ddim import alphas_cumprod
from .img2img import sigma_start

ORIGINAL_STEPS = 50
"""LCM's original (distillation) steps, A1111's constant."""
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


class LCMSchedule:
    """The LCM denoiser's discretization: the 50 original timesteps and their sigmas (float64)."""

    def __init__(self, ac: torch.Tensor, original_steps: int = ORIGINAL_STEPS):
        n = ac.shape[0]
        self.skip = n // original_steps
        self.timesteps = [k * self.skip + self.skip - 1 for k in range(original_steps)]  # 19 ... 999
        valid = ac[self.timesteps]
        self.log_sigmas = torch.log(((1 - valid) / valid) ** 0.5).tolist()

    def sigma_at(self, index: float) -> float:
        """Sigma at a fractional index into the 50 (log-sigma interpolated), index clamped to range."""
        index = min(max(index, 0.0), len(self.log_sigmas) - 1)
        lo, hi = math.floor(index), math.ceil(index)
        w = index - lo
        return math.exp((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi])

    def sigmas(self, steps: int) -> list[float]:
        """``steps`` sigmas from the top timestep to the lowest, evenly in timestep (= in index), then 0."""
        top, bottom = self.timesteps[-1], self.timesteps[0]
        ts = [top + (bottom - top) * i / (steps - 1) for i in range(steps)] if steps > 1 else [float(top)]
        return [self.sigma_at((t - (self.skip - 1)) / self.skip) for t in ts] + [0.0]

    def timestep(self, sigma: float) -> int:
        """The original timestep nearest to ``sigma`` in log-sigma (the first of a tie)."""
        ls = math.log(sigma)
        k = min(range(len(self.log_sigmas)), key=lambda j: abs(ls - self.log_sigmas[j]))
        return self.timesteps[k]


def run(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """LCM over ``ctx.steps`` steps: one model call and (but the last) one noise draw per step.
    ``x``: the starting noise at unit variance. Returns the final denoised latent."""
    sched = LCMSchedule(alphas_cumprod(ctx.model))
    sigmas = sched.sigmas(ctx.steps)
    if ctx.init is not None:  # img2img: A1111's k-diffusion slice (.img2img)
        sigmas = sigmas[sigma_start(ctx.steps, ctx.t_enc):]
    start = ctx.resume()
    if start > 0:
        x = ctx.carry["x"]
    else:
        x = x * sigmas[0] if ctx.init is None else ctx.init + x * sigmas[0]
    for i in range(start, len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        t = sched.timestep(sigma)
        eps = ctx.eps(x / (sigma**2 + 1) ** 0.5, t)
        st = t * TIMESTEP_SCALING
        c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
        c_out = st / (st**2 + SIGMA_DATA**2) ** 0.5
        x = c_out * (x - sigma * eps) + c_skip * x
        if sigma_next > 0:
            x = x + sigma_next * ctx.noise()
        ctx.step_done(i, t, x)
    return x
