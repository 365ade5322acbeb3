"""Classifier-free guidance: the small wrapper that turns a U-Net and the cond/uncond embeddings
into the denoiser a sampler calls (the sampler never sees the U-Net)."""

from __future__ import annotations

from typing import Callable

import torch

from .base import Denoiser


def unet_passes(scale: float, *, split: bool) -> int:
    """U-Net forward passes per denoiser call of :func:`guided` (what a streamed U-Net prefetches).
    ``split`` must be true also where cond and uncond differ in token count (two passes then)."""
    return 2 if (split and scale != 1.0) else 1


def runs_apart(cond: torch.Tensor, uncond: torch.Tensor, split: bool) -> bool:
    """Whether cond and uncond go through the U-Net as two passes: asked for (``split``: half the
    activation memory), or forced by different token counts (A1111 without ``pad_cond_uncond``)."""
    return split or cond.shape[1] != uncond.shape[1]


def unet_calls(scale: float, apart: bool, cond_tokens: int, uncond_tokens: int) -> list[tuple[int, int]]:
    """(batch, text tokens) of the U-Net calls one :func:`guided` denoiser call makes (``apart``:
    :func:`runs_apart`): the prompt alone at scale 1, cond and uncond apart, or both in one batch."""
    if scale == 1.0:
        return [(1, cond_tokens)]
    if apart:
        return sorted({(1, uncond_tokens), (1, cond_tokens)})
    return [(2, cond_tokens)]


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

    ``cond``/``uncond`` are (1, tokens, dim). Where their token counts differ (a prompt and a
    negative prompt of different chunk counts) they go through the U-Net as two passes, as
    AUTOMATIC1111 does by default (``pad_cond_uncond`` off: no padding with empty chunks); the
    caller counts that as ``split`` for :func:`unet_passes`. With scale == 1
    the unconditional pass is pointless and is skipped. The timestep may be fractional (the
    k-diffusion samplers interpolate it from sigma): it goes to the U-Net as float32, which embeds
    an integer timestep exactly as before.
    """
    if scale == 1.0:

        def denoise_cond(x: torch.Tensor, t: float) -> torch.Tensor:
            ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            return unet(x, ts, cond).to(x.dtype)

        return denoise_cond

    if runs_apart(cond, uncond, split):

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


class ScheduledGuidance:
    """:func:`guided` whose cond and uncond follow a prompt schedule: each call takes
    ``cond_at(n)``/``uncond_at(n)`` for its call number ``n`` (from 0, as A1111's CFG denoiser
    counts its calls; ``calls`` resumes the count after a retry), building one guided denoiser
    per pair of tensors it meets."""

    def __init__(self, unet, cond_at: Callable[[int], torch.Tensor], uncond_at: Callable[[int], torch.Tensor],
                 scale: float, *, split: bool = False, calls: int = 0, keep_last: bool = False):
        self.unet, self.cond_at, self.uncond_at, self.scale, self.split = unet, cond_at, uncond_at, scale, split
        self.calls = calls
        """Denoiser calls made so far (the next call's number)."""
        self._made: dict[tuple[int, int], Denoiser] = {}
        self.keep_last = keep_last
        self.last: tuple[torch.Tensor, float, torch.Tensor] | None = None
        """With ``keep_last``: the last call's (x, t, guided eps), for a preview of the clean
        latent it predicts (references, not copies: the step's own tensors)."""

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        c, u = self.cond_at(self.calls), self.uncond_at(self.calls)
        key = (id(c), id(u))
        denoise = self._made.get(key)
        if denoise is None:
            denoise = self._made[key] = guided(self.unet, c, u, self.scale, split=self.split)
        self.calls += 1
        eps = denoise(x, t)
        if self.keep_last:
            self.last = (x, t, eps)
        return eps
