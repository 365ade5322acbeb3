"""DDIM sampling (Song et al. 2020, "Denoising Diffusion Implicit Models") as pure functions.

The sampler never sees the U-Net: it calls ``denoise(x, t) -> eps`` (a noise estimate), which a
small guidance wrapper builds from the U-Net and the text embeddings (k-diffusion's shape).

Symbols: ``alpha_t`` here is the paper's alpha_t, i.e. the *cumulative* product of (1 - beta)
(diffusers' ``alphas_cumprod``); x_t the noisy latent; eps the predicted noise; x0 the predicted
clean latent; sigma_t the noise scale of eq. (16), controlled by eta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...config import ScheduleConfig
from .base import Denoiser, SamplingContext


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """SD v1's "scaled linear" schedule: beta linear in sqrt, then alpha_t = prod_{s<=t} (1 - beta_s).

    Computed in float64 and returned as float64 (1000,), as the original does before casting.
    """
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(cfg: ScheduleConfig, steps: int) -> list[int]:
    """Evenly strided timesteps plus the offset, descending (diffusers' "leading" spacing).

    For 50 steps: 981, 961, ..., 21, 1 -- the original CompVis list whenever ``steps`` divides
    1000 (otherwise CompVis runs one extra step; sdterm runs exactly ``steps``). Consecutive entries
    are ``stride`` apart, and the step after the last one uses alpha_0 ("final alpha from the first
    step", as CompVis does). When the offset would push the top step past the schedule (1000
    steps), it is dropped.
    """
    stride = cfg.num_train_timesteps // steps
    offset = cfg.steps_offset if (steps - 1) * stride + cfg.steps_offset < cfg.num_train_timesteps else 0
    return [i * stride + offset for i in range(steps)][::-1]


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[int, ...]
    alpha: tuple[float, ...]
    """alpha_t at each timestep (cumulative)."""
    alpha_prev: tuple[float, ...]
    """alpha at the next (less noisy) timestep; alpha_0 after the last."""

    def tail(self, n: int) -> "Schedule":
        """The last ``n`` updates (an img2img render's)."""
        k = len(self.timesteps) - n
        return Schedule(self.timesteps[k:], self.alpha[k:], self.alpha_prev[k:])

    @classmethod
    def make(cls, cfg: ScheduleConfig, steps: int) -> "Schedule":
        ac = alphas_cumprod(cfg)
        ts = ddim_timesteps(cfg, steps)
        stride = cfg.num_train_timesteps // steps
        alpha = [float(ac[t]) for t in ts]
        alpha_prev = [float(ac[t - stride]) if t - stride >= 0 else float(ac[0]) for t in ts]
        return cls(tuple(ts), tuple(alpha), tuple(alpha_prev))


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: float,
    alpha_prev: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t-1}, eq. (12) of the paper. All arithmetic in x_t's dtype."""
    # 1. predicted x0 from the noise estimate: x0 = (x_t - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
    x0 = (x_t - (1.0 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    # 2. sigma_t, eq. (16): eta * sqrt((1 - alpha_prev) / (1 - alpha_t)) * sqrt(1 - alpha_t / alpha_prev)
    sigma = eta * ((1.0 - alpha_prev) / (1.0 - alpha_t)) ** 0.5 * (1.0 - alpha_t / alpha_prev) ** 0.5
    # 3. "direction pointing to x_t": sqrt(1 - alpha_prev - sigma^2) eps
    direction = (1.0 - alpha_prev - sigma**2) ** 0.5 * eps
    # 4. x_{t-1} = sqrt(alpha_prev) x0 + direction + sigma z
    x_prev = alpha_prev**0.5 * x0 + direction
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev


def sample(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    noise: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Run the DDIM trajectory from ``x`` (pure noise x_T when ``start`` is 0; DDIM needs no
    initial scaling). ``start`` resumes after ``start`` completed steps (e.g. after a retry).

    ``noise()`` supplies z for eta > 0; ``on_step(i, t, x)`` is called after each step and may raise
    to cancel.
    """
    steps = list(zip(schedule.timesteps, schedule.alpha, schedule.alpha_prev))
    for i, (t, a, a_prev) in enumerate(steps[start:], start=start):
        eps = denoise(x, t)
        z = noise() if (eta > 0 and noise is not None) else None
        x = ddim_step(x, eps, a, a_prev, eta, z)
        if on_step is not None:
            on_step(i, t, x)
    return x


def run(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """DDIM as a registered sampler (CompVis/diffusers form: ``steps`` updates, the last one to
    alphas_cumprod[0]); the starting noise is x_T as it is. Resumes from ``ctx.carry``."""
    schedule = Schedule.make(ctx.model, ctx.steps)
    start = ctx.resume()
    if ctx.init is not None:  # img2img, CompVis's form: noised one stride above, the last t_enc updates
        a = schedule.alpha[ctx.steps - 1 - ctx.t_enc]
        if not start:
            x = a**0.5 * ctx.init + (1 - a) ** 0.5 * x
        schedule = schedule.tail(ctx.t_enc)
    if start:
        x = ctx.carry["x"]
    return sample(ctx.eps, x, schedule, eta=ctx.eta, noise=ctx.noise,
                  on_step=lambda i, t, x_now: ctx.step_done(i, t, x_now), start=start)
