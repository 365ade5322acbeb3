"""The starting noise x_T as sdterm drew it before it followed AUTOMATIC1111's generators: on the
CPU in fp32 from the seed, so a seed means the same image on every device, with the variation seed
mixed in by spherical interpolation of the whole tensor.

Renders draw through :class:`sdterm.engine.sampling.rng.ImageRNG`, whose ``rng="cpu"`` gives
exactly :func:`latents_noise`'s numbers (and its generator's later draws); this module stays as the
reference for them (tests/test_rng.py) and for :func:`slerp`, the whole-tensor interpolation."""

from __future__ import annotations

import torch


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), treating each as one vector:
    keeps the mix at the norm Gaussian noise has, unlike a linear blend."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat / a_flat.norm(), b_flat / b_flat.norm()).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # (nearly) parallel: a linear blend is exact enough
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * a.double() + (torch.sin(t * omega) / so) * b.double()
    return out.to(a.dtype)


def latents_noise(
    seed: int, width: int, height: int, subseed: int = 0, subseed_strength: float = 0.0
) -> tuple[torch.Tensor, torch.Generator]:
    """The starting noise x_T, drawn on the CPU in fp32 so a seed means the same image on any device.

    With a variation strength, the subseed's noise is mixed in by spherical interpolation
    (AUTOMATIC1111's "variation seed"). Returns the seed's generator too: eta > 0 draws its
    per-step noise from it, also on the CPU.
    """
    shape = (1, 4, height // 8, width // 8)
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if subseed_strength > 0:
        sub = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed), dtype=torch.float32)
        x = slerp(subseed_strength, x, sub)
    return x, gen
