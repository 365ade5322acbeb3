"""PLMS: pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds"), as CompVis's ``PLMSSampler`` and AUTOMATIC1111 run it.

Each step is a DDIM update (eta 0) driven by an eps that is a linear multistep combination of the
noise estimates of the last steps (Adams-Bashforth on eps):

* first step: pseudo improved Euler. A DDIM update with eps_t gives a provisional x at the next
  timestep, the model is asked once more there, and the step is redone with the mean of the two
  estimates (the one extra model call PLMS makes; the second estimate is not kept);
* then 2nd, 3rd and from the 4th step on 4th-order Adams-Bashforth over the kept estimates.

Timesteps: CompVis's / diffusers' "leading" spacing, ``i * (1000 // steps) + 1`` (981, 961, ..., 1
for 50), ``steps`` updates, the last one to alphas_cumprod[0] -- the same trajectory as diffusers'
``PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)`` and as A1111 up to
v1.5 (which ran CompVis's sampler) whenever ``steps`` divides 1000. (For other step counts CompVis
takes ``range(0, 1000, 1000 // steps) + 1`` and so runs more updates, 8 for 7; A1111 v1.5 also
turned 3 into 4, 9 into 10, 27 into 28. sdterm runs exactly ``steps``, as its DDIM does.) With one
step there is no "next" timestep: it is a plain DDIM step (one model call), as in diffusers.

A1111 v1.6 and later (``sd_samplers_timesteps_impl.plms``) make one update fewer, like their DDIM:
they take ``range(0, 1000, 1000 // steps) + 1`` (clipped to 999) and stop at the lowest timestep
instead of stepping on to alphas_cumprod[0]. :func:`run_webui` is that form (for step counts that
divide 1000 it is :func:`run` stopped one step early); :func:`run` is what the registry names.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from .base import SamplingContext
from .ddim import alphas_cumprod


def plms_timesteps(num_train_timesteps: int, steps: int, offset: int = 1) -> list[int]:
    """CompVis/diffusers "leading" timesteps, descending: ``i * (N // steps) + offset``.

    The offset is dropped when it would push the top timestep past the schedule (``steps == N``),
    as sdterm's DDIM does.
    """
    stride = num_train_timesteps // steps
    if (steps - 1) * stride + offset >= num_train_timesteps:
        offset = 0
    return [i * stride + offset for i in range(steps)][::-1]


def webui_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """A1111 v1.6+'s timesteps for its DDIM/PLMS/UniPC, ascending as it builds them:
    ``clip(range(0, N, N // steps) + 1, 0, N - 1)``. For ``steps`` that don't divide N there are
    more than ``steps`` of them (30 -> 31)."""
    return [min(t + 1, num_train_timesteps - 1) for t in range(0, num_train_timesteps, num_train_timesteps // steps)]


def _update(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float) -> torch.Tensor:
    """DDIM (eta 0) from alpha a_t to a_prev: x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), then
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps


def _multistep(eps: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth on eps over the kept estimates ``old`` (oldest first), order len(old) + 1."""
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


def _sample(ctx: SamplingContext, x: torch.Tensor, plan: list[tuple[int, int, float, float]],
            extra_first: bool) -> torch.Tensor:
    """Run the updates of ``plan``: (t, t_next, alpha_t, alpha_next) each. The carry holds the last
    three eps estimates under "eps"."""
    start = ctx.resume()
    old: list[torch.Tensor] = []
    if start > 0:
        x = ctx.carry["x"]
        old = list(ctx.carry["eps"])
    for i in range(start, len(plan)):
        t, t_next, a_t, a_next = plan[i]
        eps = ctx.eps(x, t)
        if not old:
            if extra_first:  # pseudo improved Euler: look ahead once, average the two estimates
                eps_next = ctx.eps(_update(x, eps, a_t, a_next), t_next)
                e = (eps + eps_next) / 2
            else:
                e = eps
        else:
            e = _multistep(eps, old)
        x = _update(x, e, a_t, a_next)
        old = (old + [eps])[-3:]
        ctx.step_done(i, t, x, eps=list(old))
    return x


def run(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """PLMS over ``ctx.steps`` updates (CompVis/diffusers form); ``steps + 1`` model calls (1 for
    one step). ``x``: the starting noise at unit variance, used as it is (x_T)."""
    cfg = ctx.model
    ac = alphas_cumprod(cfg)
    ts = plms_timesteps(cfg.num_train_timesteps, ctx.steps, cfg.steps_offset)
    stride = cfg.num_train_timesteps // ctx.steps
    plan = []
    for t in ts:
        t_next = t - stride
        plan.append((t, t_next, float(ac[t]), float(ac[t_next]) if t_next >= 0 else float(ac[0])))
    if ctx.init is not None:  # img2img, CompVis's form (as DDIM): noised one stride above, the last t_enc updates
        a = float(ac[ts[ctx.steps - 1 - ctx.t_enc]])
        if not ctx.resume():
            x = a**0.5 * ctx.init + (1 - a) ** 0.5 * x
        plan = plan[ctx.steps - ctx.t_enc:]
    return _sample(ctx, x, plan, extra_first=len(plan) > 1)


def run_webui(ctx: SamplingContext, x: torch.Tensor) -> torch.Tensor:
    """PLMS exactly as A1111 v1.6+ runs it: over :func:`webui_timesteps`, one update fewer than
    there are timesteps (``steps - 1`` when ``steps`` divides 1000), ending at the lowest timestep
    (1), the extra model call on the first update. One step makes no update at all (returns x)."""
    cfg = ctx.model
    ac = alphas_cumprod(cfg)
    ts = webui_timesteps(cfg.num_train_timesteps, ctx.steps)[::-1]
    plan = [(t, t_next, float(ac[t]), float(ac[t_next])) for t, t_next in pairwise(ts)]
    return _sample(ctx, x, plan, extra_first=True)
