"""What a render returns, and how it ends when it doesn't: the result record and the two
exceptions a front end handles (cancelled, out of memory even with the cheapest plan)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ..params import Params
from .events import StageStats


class Cancelled(Exception):
    """The render was cancelled; nothing was written."""


@dataclass
class Result:
    image: Image.Image
    request: Params
    seconds: float
    stages: list[StageStats]
    model_name: str
    model_hash: str
    demo: bool
    latents: torch.Tensor = field(repr=False)
    notices: list[str] = field(default_factory=list)
    plan: str = "staged"
    """How the models were placed for this render (the planner's description)."""
    prompts: dict = field(default_factory=dict)
    """Per role ("prompt", "negative"): tokens, chunks, embeddings, schedule (:func:`prompt_summary`)."""
    loras: list[dict] = field(default_factory=list)
    """The LoRAs used: name, te and unet weights, dyn, hash, file."""
    infotext_extra: dict[str, str] = field(default_factory=dict)
    """Infotext fields the render adds (``TI hashes``), as A1111 writes them."""
    prepare_seconds: float = 0.0
    """Of ``seconds``, those before the first stage: the prompts tokenized, the prompt cache
    looked up (a first use may wait for the text encoder's digest, its key), the plan made."""
    trail: list | None = field(default=None, repr=False)
    """With ``generate(trail=True)``: the sampler's state after each step of the first pass
    (``fork.TrailStep``, index k = after k + 1 steps), what ``generate(fork=...)`` starts from."""


def to_image(decoded: torch.Tensor, *, truncate: bool = False) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> an RGB PIL image, 8-bit by rounding (diffusers' convention), or
    with ``truncate`` by truncation as A1111 writes ``255 * x`` (its hires fix's pixel path)."""
    x = decoded[0].float().clamp(-1, 1)
    x = ((x + 1) / 2 * 255) if truncate else ((x + 1) * 127.5).round()
    return Image.fromarray(x.to(torch.uint8).permute(1, 2, 0).cpu().numpy(), "RGB")


class OutOfMemory(RuntimeError):
    """Out of device memory even with the cheapest plan; one line for the user."""
