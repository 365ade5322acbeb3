"""Samplers as plain functions over a denoiser callable (k-diffusion's shape), and their registry.

A sampler is one module here that defines ``SAMPLER`` (a :class:`Sampler`: its A1111 name and its
``run`` function) plus one entry in :data:`SAMPLERS` below. ``guidance.py`` turns a U-Net and the
text embeddings into the denoiser every sampler calls.
"""

from __future__ import annotations

from . import ddim
from .base import Denoiser, Sampler

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (ddim.SAMPLER,)}
"""Every sampler by its A1111 name."""

DEFAULT_SAMPLER = "DDIM"

__all__ = ["DEFAULT_SAMPLER", "Denoiser", "SAMPLERS", "Sampler"]
