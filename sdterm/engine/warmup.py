"""Warming an engine up before its first render: what a first render in a process pays besides
the render (the models read into host memory, CUDA's kernels loaded, cuDNN's algorithms picked,
the U-Net's graph captured) paid ahead, while nobody waits; the app does it while the user types.

On a GPU it is one short throwaway render at the size and guidance the user will render with, of
an empty prompt that the text encoder encodes even when the embedding cache has it: a user's
first prompt is most often a new one, which then finds the encoder read and its first call made.
Nothing is saved or recorded. A first real render at that size then replays the U-Net at once
(resident plan) or captures it without an eager call first (staged, streamed). On the CPU nothing
is done: kernels there need no loading, and a CPU render is slow.
"""

from __future__ import annotations

from ..params import Params
from .memory.planner import BudgetTooSmall
from .result import OutOfMemory

WARM_STEPS = 2
"""Two U-Net calls: the first runs eagerly (kernels, algorithms), the second captures the graph."""


def warm_up(engine, width: int, height: int, cfg: float) -> bool:
    """Warm ``engine`` up for ``width`` x ``height`` renders at guidance ``cfg``; False when there
    was nothing to do (the CPU) or the render did not fit the budget (the first real render then
    says so, with the size the user asked for)."""
    if engine.device.type != "cuda":
        return False
    req = Params(prompt="", negative="", seed=0, steps=WARM_STEPS, cfg=cfg, width=width, height=height,
                 sampler="Euler").validated()
    try:
        engine.generate(req, encode_text=True)
    except (OutOfMemory, BudgetTooSmall):
        return False
    return True


__all__ = ["WARM_STEPS", "warm_up"]
