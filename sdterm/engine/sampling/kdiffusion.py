"""The k-diffusion view of an eps-prediction model, as AUTOMATIC1111 builds it for SD v1.

A1111 wraps the CompVis model in k-diffusion's ``CompVisDenoiser`` (a ``DiscreteEpsDDPMDenoiser``
with ``quantize=False`` unless its "enable_quantization" option is on). That wrapper sees the model
through its 1000 discrete noise levels

    sigma_t = sqrt((1 - alpha_t) / alpha_t),   alpha_t = alphas_cumprod[t],

computed from the float32 ``alphas_cumprod`` buffer a CompVis model registers (the schedule is
built in float64 and stored as float32), so the sigmas and their logs are float32 here too. A
continuous sigma maps to a fractional timestep by linear interpolation of log-sigma between the
two neighbouring discrete levels (clamped to [0, 999]), and back the same way; the U-Net sees the
fractional timestep. The denoised estimate of the latent x (at noise level sigma, *unscaled* by
k-diffusion's convention: x = x0 + sigma * eps) is

    c_in = 1 / sqrt(sigma^2 + 1),   denoised = x - sigma * eps(x * c_in, t(sigma)),

where x * c_in is the DDPM latent sqrt(alpha) x0 + sqrt(1 - alpha) eps that sdterm's ``ctx.eps``
takes. The arithmetic follows k-diffusion's order, in float32 for the scalars, so a sampler built
on it lands on k-diffusion's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from ...config import ScheduleConfig
from .base import SamplingContext
from .ddim import alphas_cumprod

KDenoiser = Callable[[torch.Tensor, "torch.Tensor | float"], torch.Tensor]
"""``model(x, sigma) -> denoised``: k-diffusion's denoiser shape (``sigma`` a scalar)."""


class DiscreteSigmas:
    """A model's discrete noise levels and the sigma <-> timestep maps (k-diffusion's
    ``DiscreteSchedule`` with ``quantize=False``), on the CPU in float32."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose interpolated log-sigma is log(sigma), in [0, len - 1]."""
        sigma = torch.as_tensor(sigma, dtype=self.sigmas.dtype) if not torch.is_tensor(sigma) else sigma
        shape = sigma.shape
        # At least 1-d, as k-diffusion's batched sigma is: a 0-d float64 sigma would otherwise be
        # computed in the table's float32 (0-d tensors don't set the result's dtype).
        log_sigma = sigma.reshape(-1).log()
        dists = log_sigma - self.log_sigmas[:, None]
        # The last discrete level at or below sigma (never the top one, so high = low + 1 exists).
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The sigma at fractional timestep ``t``: log-sigma interpolated between floor and ceil."""
        t = torch.as_tensor(t).float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """The model's own n-step schedule: timesteps evenly from the top (999) down to 0, then 0
        (A1111's "Uniform", and what "Automatic" means for samplers without a default)."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return append_zero(self.t_to_sigma(t))


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


@lru_cache(maxsize=8)
def discrete_sigmas(cfg: ScheduleConfig) -> DiscreteSigmas:
    """The model's discrete sigmas, from alphas_cumprod stored as float32 (as a CompVis model does)."""
    acp = alphas_cumprod(cfg).to(torch.float32)
    return DiscreteSigmas(((1 - acp) / acp) ** 0.5)


def denoiser(ctx: SamplingContext) -> KDenoiser:
    """``model(x, sigma) -> denoised`` over ``ctx.eps`` (k-diffusion's ``CompVisDenoiser``)."""
    d = discrete_sigmas(ctx.model)
    eps = ctx.eps

    def model(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        # k-diffusion's samplers pass ``sigma * x.new_ones(batch)``: sigma in the latent's dtype
        # (float32 in A1111; float64 latents keep it there). Half latents keep float32 scalars.
        sigma = torch.as_tensor(sigma, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        c_out, c_in = -sigma, 1 / (sigma**2 + 1.0) ** 0.5
        t = d.sigma_to_t(sigma)
        return x + eps(x * c_in, float(t)) * c_out

    return model
