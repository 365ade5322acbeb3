"""Where an img2img render starts in each sampler's schedule, as AUTOMATIC1111 and CompVis count.

t_enc = int(min(strength, 0.999) * steps) (A1111's ``setup_img2img_steps`` with its default
``img2img_fix_steps`` off; the product in Python floats, as A1111 computes it). Then:

* k-diffusion samplers and LCM (A1111 runs LCM through its k-diffusion sampler): the txt2img
  sigmas, sliced ``sigmas[steps - t_enc - 1:]``; the start is ``init + noise * sigma_sched[0]``
  and the sampler makes ``t_enc + 1`` steps over the slice (A1111's ``sample_img2img``). The SDE
  samplers' Brownian tree keeps the full schedule's sigma range, as A1111 builds it.
* DDIM, PLMS and UniPC, CompVis's form (``DDIMSampler.stochastic_encode`` then ``decode``): the
  init latent is noised to the alpha of the t_enc-th timestep counted from the lowest (one stride
  above the first one denoised), then the last ``t_enc`` updates of the text-to-image trajectory
  run, the last to alphas_cumprod[0]. (diffusers' img2img noises to the first timestep it
  denoises, one stride lower: tests/test_img2img.py checks that difference.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ...samplers import SamplerInfo


def t_enc(strength: float, steps: int) -> int:
    """A1111's t_enc: how deep into the schedule an img2img render starts."""
    return int(min(strength, 0.999) * steps)


def sigma_start(steps: int, t: int) -> int:
    """Where A1111 slices the sigmas for t_enc ``t``: ``sigmas[steps - t - 1:]`` (never below 0)."""
    return max(steps - t - 1, 0)


def sigma_form(info: SamplerInfo) -> bool:
    """True for the samplers sliced by sigmas (k-diffusion, LCM); False for the CompVis-form ones."""
    return info.k_diffusion or info.name == "LCM"


@dataclass(frozen=True)
class Img2ImgPlan:
    first: int
    """Index in the sampler's own step list of the first step run."""
    steps_run: int
    """Steps the sampler makes."""


def plan(info: SamplerInfo, steps: int, schedule_steps: int, t: int) -> Img2ImgPlan:
    """Where the sampler starts for t_enc ``t``; ``schedule_steps``: the steps its schedule really
    makes (``len(sigmas) - 1``; ``steps`` but for A1111's "DDIM" schedule)."""
    if sigma_form(info):
        first = sigma_start(steps, t)
        return Img2ImgPlan(first, schedule_steps - first)
    return Img2ImgPlan(steps - t, t)
