"""What a sampler is to the rest of the engine: a name and a function over a denoiser callable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
"""``denoise(x, t) -> eps``: the noise estimate at timestep ``t`` (guidance already applied)."""


class SampleFn(Protocol):
    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        *,
        schedule,
        steps: int,
        eta: float,
        noise: Callable[[], torch.Tensor] | None,
        on_step: Callable[[int, int, torch.Tensor], None] | None,
        start: int,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Sampler:
    name: str
    """The AUTOMATIC1111 name: what ``--sampler``, the infotext and ``sdterm show`` use."""
    run: SampleFn
    """Sample from the starting noise ``x`` (``start`` completed steps skipped, for a retry);
    ``schedule`` is the model's ScheduleConfig; ``noise()`` draws per-step noise on the seed's
    generator; ``on_step(i, t, x)`` after each step may raise to cancel."""
    calls_per_step: int = 1
    """Denoiser calls per step (2 for Heun-style samplers): what a streamed U-Net prefetches."""
