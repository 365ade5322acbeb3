"""Classifier-free guidance: the small wrapper that turns a U-Net and the cond/uncond embeddings
into the denoiser a sampler calls (the sampler never sees the U-Net)."""

from __future__ import annotations

from typing import Callable

import torch

from .base import Denoiser


def unet_passes(scale: float, *, split: bool) -> int:
    """U-Net forward passes per denoiser call of :func:`guided` (what a streamed U-Net prefetches)."""
    return 2 if (split and scale != 1.0) else 1


def guided(
    unet: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    *,
    split: bool = False,
) -> Denoiser:
    """Classifier-free guidance: eps = eps_u + scale (eps_c - eps_u), both in one batch of two
    (or, with ``split``, two passes of one: half the activation memory, same result).

    ``cond``/``uncond`` are (1, tokens, dim) and must have the same token count. With scale == 1
    the unconditional pass is pointless and is skipped. The timestep may be fractional (the
    k-diffusion samplers interpolate it from sigma): it goes to the U-Net as float32, which embeds
    an integer timestep exactly as before.
    """
    if scale == 1.0:

        def denoise_cond(x: torch.Tensor, t: float) -> torch.Tensor:
            ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            return unet(x, ts, cond).to(x.dtype)

        return denoise_cond

    if split:

        def denoise_split(x: torch.Tensor, t: float) -> torch.Tensor:
            ts = torch.full((1,), t, device=x.device, dtype=torch.float32)
            eps_u = unet(x, ts, uncond).to(x.dtype)
            eps_c = unet(x, ts, cond).to(x.dtype)
            return eps_u + scale * (eps_c - eps_u)

        return denoise_split

    context = torch.cat([uncond, cond])  # (2, tokens, dim): [unconditional, conditional]

    def denoise(x: torch.Tensor, t: float) -> torch.Tensor:
        ts = torch.full((2,), t, device=x.device, dtype=torch.float32)
        eps_u, eps_c = unet(torch.cat([x, x]), ts, context).to(x.dtype).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return denoise


def pair_conditioning(embs: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, tokens, dim) cond and uncond in ``dtype``, with the same token count: cond and uncond
    share one U-Net batch, so the shorter is padded with the empty prompt's chunk (``embs["padding"]``,
    present when the counts differ), as AUTOMATIC1111 does."""
    cond, uncond = embs["prompt"], embs["negative"]
    n = max(cond.shape[0], uncond.shape[0])
    if "padding" in embs:
        pad = embs["padding"]
        cond = torch.cat([cond, *[pad] * ((n - cond.shape[0]) // pad.shape[0])])
        uncond = torch.cat([uncond, *[pad] * ((n - uncond.shape[0]) // pad.shape[0])])
    return cond[None].to(dtype), uncond[None].to(dtype)
