"""cuDNN's attention plans built while the U-Net's weights are still being read.

On an H100 (torch 2.11) SDPA runs the U-Net's attention with cuDNN, which builds an execution plan
the first time a thread sees a shape and keeps it in a cache of that thread. A first U-Net call in
a process spent 0.42 s of its 1.04 s in those builds (3.6 s of 4.7 s in the first process on a
fresh machine), against 3 ms for the same calls the second time. The plans depend on the shapes
alone, so the render thread can build them while the weights are read on other threads: the
engine calls :func:`warm_attention` with every attention input the render's U-Net calls will
make (their batches and text lengths: sampling/guidance.py's ``unet_calls``), while the U-Net is
built. With SDPA's flash kernel forced instead, the same first calls took 65 ms on that card; the
calls are made only while the render waits for the weights anyway.

Where the plan places the U-Net whole, the engine warms the whole forward instead (model_warm.py:
a stand-in's calls build these plans too); this is what a streamed U-Net gets, whose weights are
never all on the device at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import UNetConfig


def transformer_inputs(cfg: UNetConfig, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
    """(channels, pixel tokens) of the U-Net's spatial transformers at this latent size, each
    distinct pair once: the levels in ``attention_resolutions`` (the way up has the way down's
    sizes) and the middle block. A stride-2 convolution rounds an odd side up."""
    found = set()
    h, w = latent_h, latent_w
    for level, mult in enumerate(cfg.channel_mult):
        if 2**level in cfg.attention_resolutions:
            found.add((cfg.model_channels * mult, h * w))
        if level != len(cfg.channel_mult) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
    found.add((cfg.model_channels * cfg.channel_mult[-1], h * w))  # the middle block's
    return sorted(found)


def warm_attention(cfg: UNetConfig, calls: list[tuple[int, int]], latent_h: int, latent_w: int,
                   dtype: torch.dtype, device: torch.device) -> None:
    """Run SDPA once on every (query, key/value) shape and layout the U-Net's attention will see:
    self-attention over the pixel tokens and cross-attention on the text, laid out as
    ``CrossAttention`` lays them out (a (b, n, heads * d) projection viewed as (b, heads, n, d)).
    The values are whatever the memory held: only the shapes matter."""
    heads = cfg.num_heads
    with torch.inference_mode():
        for channels, pixels in transformer_inputs(cfg, latent_h, latent_w):
            d = channels // heads
            for batch, tokens in calls:
                q = torch.empty(batch, pixels, channels, dtype=dtype, device=device).view(batch, pixels, heads, d)
                q = q.transpose(1, 2)
                F.scaled_dot_product_attention(q, q, q)
                kv = torch.empty(batch, tokens, channels, dtype=dtype, device=device).view(batch, tokens, heads, d)
                kv = kv.transpose(1, 2)
                F.scaled_dot_product_attention(q, kv, kv)


__all__ = ["transformer_inputs", "warm_attention"]
