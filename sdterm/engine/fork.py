"""Forking a render from one of its steps: the sampler's state after each step of a render, kept in
host memory, and a new render that resumes from one of them with another prompt, CFG or sampler.

A render asked to keep its trail (``Engine.generate(trail=True)``) records, after each step of
its (first) sampler run, what a resumed run needs: the sampler's carry (the latent, a multistep
sampler's history: the same state an out-of-memory retry resumes from), the per-step noise
generator's state and the guidance's call count (the prompt schedule follows it). Each step's
copy is queued on the device (no waiting) and the lot moves to host memory when the sampler is
done: about 64 KiB a step at 512x512, more for multistep samplers.

``generate(fork=Fork(step, trail_step, parent))`` starts from that state: the U-Net runs only the
remaining steps. What may change: the prompt, the negative, CFG, LoRAs, clip skip, eta. The
latent and its noise are the parent's, so the seed, size, steps, schedule and init image must be
the parent's; the sampler may change within the k-diffusion family (they share the latent's
scale and, with the same schedule, the sigmas): the new sampler takes the latent and starts its
own history afresh at that step. A step-0 fork is a plain render.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..params import Params
from ..samplers import SAMPLERS, resolve_schedule


@dataclass(frozen=True)
class TrailStep:
    """The state after ``step`` steps (1-based) of a render."""

    step: int
    carry: dict[str, Any]
    """The sampler's carry, tensors on the host."""
    rng_state: Any
    calls: int
    """Guidance calls made so far."""


@dataclass(frozen=True)
class Fork:
    """Start a render at ``at.step`` of ``parent``'s trail."""

    parent: Params
    at: TrailStep


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def snapshot(carry: dict, rng_state, calls: int) -> TrailStep:
    """The state after the step ``carry`` records: a copy on its device (queued, no waiting; a few
    latents a step), for :func:`to_host` at the end of the render."""
    return TrailStep(int(carry["step"]), _map(dict(carry), torch.clone), rng_state, calls)  # get_state: a copy


def to_host(step: TrailStep) -> TrailStep:
    """``step`` with its tensors in host memory (waits for them on a GPU)."""
    return TrailStep(step.step, _map(step.carry, lambda t: t.cpu()), step.rng_state, step.calls)


def to_device(carry: dict, device: torch.device) -> dict:
    """A trail step's carry on ``device`` (a fresh copy: the trail stays as it was)."""
    return _map(dict(carry), lambda t: t.to(device, copy=True))


PARENTS = {"seed": "seed", "subseed": "variation seed", "subseed_strength": "variation strength", "width": "width",
           "height": "height", "steps": "steps", "rng": "rng", "init_image": "init image",
           "strength": "denoising strength"}
"""The fields a fork must share with its parent (its latent at the step holds their effect), by
what they are called in a message; the schedule too (compared as the sampler resolves it)."""


def from_parent(req: Params, parent: Params) -> Params:
    """``req`` with what a fork takes from ``parent``: :data:`PARENTS`, the schedule and the init
    image's resize mode (not validated)."""
    return req.replace(**{name: getattr(parent, name) for name in (*PARENTS, "schedule", "resize_mode")})


def check(fork: Fork, req: Params) -> None:
    """ConfigError (one line) when ``req`` can't resume from ``fork``."""
    parent = fork.parent
    for name, what in PARENTS.items():
        if getattr(parent, name) != getattr(req, name):
            raise ConfigError(f"fork: the {what} must be the parent's ({getattr(parent, name)!r}, not "
                              f"{getattr(req, name)!r}): the latent at step {fork.at.step} holds its noise")
    if resolve_schedule(parent.sampler, parent.schedule) != resolve_schedule(req.sampler, req.schedule):
        raise ConfigError("fork: the schedule must be the parent's (the latent is at its noise level); "
                          "change the sampler, prompt or CFG instead")
    if parent.sampler != req.sampler and not (SAMPLERS[parent.sampler].k_diffusion and SAMPLERS[req.sampler].k_diffusion):
        raise ConfigError(f"fork: from {parent.sampler} only to {parent.sampler} or, among the k-diffusion "
                          f"samplers, to another of them ({req.sampler} keeps its latent at another scale)")


def resume_carry(fork: Fork, req: Params, device: torch.device) -> dict:
    """The carry a forked render starts from: all of it for the parent's sampler, the latent alone
    (a fresh history at that step) for another k-diffusion sampler."""
    carry = to_device(fork.at.carry, device)
    if req.sampler != fork.parent.sampler:
        carry = {"step": carry["step"], "x": carry["x"]}
    return carry
