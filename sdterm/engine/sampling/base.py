"""What a sampler is to the rest of the engine: a function over a :class:`SamplingContext`.

Every sampler — DDIM, PLMS, UniPC, LCM and the k-diffusion family — is a plain function
``fn(ctx, x) -> latents`` where ``x`` is the starting noise at unit variance (each sampler scales it
as its convention says: k-diffusion multiplies by the first sigma, DDIM uses it as it is). The
function calls only what the context gives it: the guided noise estimate, the noise source, the
step hook; so CFG, the stage meter, cancellation, retries and every memory plan are the same for
all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...config import ScheduleConfig
from ...samplers import SamplerInfo

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
"""``eps(x, t) -> eps``: the guided noise estimate at (possibly fractional) timestep ``t`` of the
model's 1000, for the *unscaled* latent x_t = sqrt(alpha) x0 + sqrt(1 - alpha) eps."""

NoiseSource = Callable[[], torch.Tensor]
"""Draws the next per-step noise (the shape of the latent, unit variance), in A1111's order."""


@dataclass
class SamplingContext:
    eps: Denoiser
    """The guided U-Net: the only way a sampler reaches the model."""
    model: ScheduleConfig
    """The model's training schedule (betas -> alphas_cumprod -> sigmas)."""
    steps: int
    """Sampling steps, as the user set them."""
    schedule: str
    """The resolved schedule name ("Karras", ...; never "Automatic"); ignored by samplers that bring
    their own timesteps (DDIM, PLMS, UniPC, LCM)."""
    eta: float = 0.0
    """DDIM's eta (A1111's "Eta DDIM")."""
    eta_ancestral: float = 1.0
    """The ancestral and SDE samplers' eta (A1111's "Eta")."""
    noise: NoiseSource | None = None
    """The next per-step noise draw (ancestral samplers, DDIM with eta > 0, LCM)."""
    brownian: Callable[[torch.Tensor, float, float], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None
    """``brownian(x, sigma_min, sigma_max) -> noise_sampler(sigma, sigma_next)`` for the SDE samplers:
    k-diffusion's BrownianTreeNoiseSampler seeded as A1111 seeds it."""
    on_step: Callable[[int, float, torch.Tensor], None] | None = None
    """``on_step(i, t, x)`` after each completed step (``t``: that step's timestep or sigma, for
    display); may raise to cancel. Called after ``carry`` holds the state after step i."""
    carry: dict[str, Any] = field(default_factory=dict)
    """The sampler's state after its last completed step, for a retry to resume from: the sampler
    writes ``carry["step"]`` (steps done), ``carry["x"]`` and whatever else it needs (a multistep
    sampler's history) before calling ``on_step``; when it is called with ``carry["step"] > 0`` it
    resumes from there and must produce exactly what an uninterrupted run would have."""
    info: SamplerInfo | None = None
    """The sampler's registry entry."""
    init: torch.Tensor | None = None
    """img2img: the clean init latent (the VAE encoder's scaled posterior mean); None for
    text-to-image. The sampler noises it to where it starts (:mod:`.img2img`) with ``x`` as the
    noise and runs only the rest of its schedule."""
    t_enc: int = 0
    """img2img: A1111's t_enc, ``int(min(strength, 0.999) * steps)`` (:func:`.img2img.t_enc`)."""

    def step_done(self, i: int, t: float, x: torch.Tensor, **state: Any) -> None:
        """Record the state after step ``i`` in :attr:`carry`, then call :attr:`on_step`."""
        self.carry.update(state, step=i + 1, x=x)
        if self.on_step is not None:
            self.on_step(i, t, x)

    def resume(self) -> int:
        """The first step to run: 0, or the steps a failed attempt completed (state in :attr:`carry`)."""
        return int(self.carry.get("step", 0))


SampleFn = Callable[[SamplingContext, torch.Tensor], torch.Tensor]
"""``fn(ctx, x) -> latents``: x is the starting noise at unit variance (or, when
``ctx.resume() > 0``, ignored in favour of ``ctx.carry["x"]``)."""


@dataclass(frozen=True)
class Sampler:
    info: SamplerInfo
    """The name and call counts (``sdterm/samplers.py``)."""
    run: SampleFn

    @property
    def name(self) -> str:
        return self.info.name
