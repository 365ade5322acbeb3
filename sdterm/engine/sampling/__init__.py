"""Samplers as plain functions over a sampling context (k-diffusion's shape), and their registry.

The names, call counts and where each sampler's function lives are ``sdterm/samplers.py`` (a leaf:
the command line checks names without torch); :func:`get_sampler` imports the function when a
render needs it. A new sampler is one function in a module here and one entry there.
``guidance.py`` turns a U-Net and the text embeddings into the denoiser every sampler calls.
"""

from __future__ import annotations

import importlib

from ...samplers import DEFAULT_SAMPLER, SAMPLERS as SAMPLER_INFO
from .base import Denoiser, Sampler, SamplingContext


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (an A1111 name of :data:`sdterm.samplers.SAMPLERS`); KeyError otherwise."""
    info = SAMPLER_INFO[name]
    module = importlib.import_module(f"{__name__}.{info.module}")
    return Sampler(info, getattr(module, info.function))


__all__ = ["DEFAULT_SAMPLER", "Denoiser", "Sampler", "SamplingContext", "get_sampler"]
