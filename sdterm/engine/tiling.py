"""Tiled VAE decoding under a memory budget, and the activation estimate that sizes the tiles.

A whole decode holds several full-resolution feature maps at once (hundreds of MiB for 512x512
in fp16, growing with the pixel count), far more than the decoder's weights. ``decode_latents``
decodes overlapping latent tiles one at a time and blends them in pixel space, so the peak is
one tile's activations plus the output image. ``choose_tile`` picks the largest tile whose decode
fits a budget, from ``vae_activation_bytes``.

Blending: along each axis a tile's weight ramps linearly from ~0 at an edge it shares with a
neighbour to 1 over the full width of that overlap, and stays 1 at the image border. The 2-D
weight is the product of the two axes' weights; because the tiles form a grid, the sum of all
tile weights is the product of the per-axis sums, so each tile's weights are divided by those
sums up front and the output needs neither a weight buffer nor a final division. Interior
pixels that one tile alone covers get weight exactly 1.

Tiles are not exactly the whole decode: GroupNorm statistics are taken per tile instead of over
the image, the mid-block attention sees only the tile, and convolutions zero-pad at tile edges
(the ramps give those edge pixels almost no weight). The first two are the visible part: small
tone shifts between distant tiles, blended smoothly, never a seam.
"""

from __future__ import annotations

import torch

from ..config import VAEConfig
from . import vae as _vae
from .vae import VAEDecoder

# --------------------------------------------------------------------------------------------
# Activation estimate
# --------------------------------------------------------------------------------------------
#
# Counts follow the eager forward pass under no_grad: a tensor is alive while a Python name or
# an argument in some frame still refers to it. Units are "copies" of one feature map (channels x
# pixels of the stage in question). With C_i = ch * ch_mult[i] and level i at (h * 2^(L-1-i)) x
# (w * 2^(L-1-i)) pixels (L = len(ch_mult); level 0 is the full 8h x 8w resolution):
#
#   ResnetBlock(Cin -> Cout) at p pixels:   p * max(RESNET_INPUT_COPIES * Cin,
#                                                    Cin + RESNET_OUTPUT_COPIES * Cout)
#       phase 1: x, norm1(x), silu(norm1(x)); phase 2: x, h, norm2(h), silu(norm2(h)) (then x, h,
#       conv2 out, and later x, conv2 out, shortcut, sum).
#   Upsample(C) from p to 4p pixels:        C * p + UPSAMPLE_OUTPUT_COPIES * C * 4p
#       the input, the nearest-neighbour interpolated tensor and the conv output.
#   Every block of a level after the first also pays for the level's input, which
#   ``Decoder.forward`` keeps alive (``h = level(h)``) until the level returns.
#   Mid attention at n = h*w tokens (C = top channels, conv_in's output held by Mid.forward):
#       ATTN_TOKEN_COPIES * C * n * itemsize + ATTN_SCORE_COPIES * rows * n * ATTN_SCORE_ITEMSIZE
#       (+ ATTN_UPCAST_COPIES * C * n * 4 for fp16/bf16), with rows = n, or ATTN_CHUNK_SCORES // n
#       when n > ATTN_CHUNK_THRESHOLD (vae.py). The score term assumes SDPA's math kernel, which is
#       what runs today: the transposed q/k/v views have a last-dim stride != 1, which every fused
#       kernel rejects.
#   Output: level 0's output, norm_out and silu (NORM_OUT_COPIES * C_0), plus the 3-channel image.
#
# For SD v1 (ch 128, ch_mult 1 2 4 4) the peak is at level 0: its first block turns the 256-channel
# upsampled input into 128 channels (3 * 256 copies), and its later blocks hold that input plus
# 4 * 128: 768 channels x 8h x 8w, i.e. 384 MiB at 512x512 in fp16. The result is multiplied by
# ACTIVATION_MARGIN and WORKSPACE_BYTES is added for what the count cannot see.

RESNET_INPUT_COPIES = 3
"""Full-size copies of a ResnetBlock's input alive at once: x, norm1(x), silu(norm1(x))."""
RESNET_OUTPUT_COPIES = 3
"""Copies of a ResnetBlock's output width alive beside its input: h, norm2(h), silu(norm2(h))."""
UPSAMPLE_OUTPUT_COPIES = 2
"""Upsample tensors at the doubled resolution: the interpolated input and the conv output."""
NORM_OUT_COPIES = 3
"""Level 0's output, norm_out(h) and silu(...) before conv_out."""
ATTN_TOKEN_COPIES = 6
"""Mid attention, in (top channels x h*w) units: x, q, k, v, the output buffer, one chunk/projection."""
ATTN_SCORE_COPIES = 2
"""Score matrices alive in SDPA's math kernel: q k^T and its softmax."""
ATTN_SCORE_ITEMSIZE = 4
"""Bytes per score: the math kernel computes fp16/bf16 attention in fp32 by default."""
ATTN_UPCAST_COPIES = 3
"""fp32 copies of k, v and the query chunk that the math kernel makes for fp16/bf16 inputs."""
ACTIVATION_MARGIN = 1.10
"""Multiplier for allocator rounding and fragmentation and for GroupNorm/conv scratch (calibrate)."""
WORKSPACE_BYTES = 32 * 2**20
"""Fixed extra bytes for convolution workspaces (cuDNN) and kernel scratch (calibrate)."""


def _resnet_copies(cin: int, cout: int) -> int:
    return max(RESNET_INPUT_COPIES * cin, cin + RESNET_OUTPUT_COPIES * cout)


def _attention_bytes(channels: int, n: int, itemsize: int) -> int:
    rows = n if n <= _vae.ATTN_CHUNK_THRESHOLD else min(n, max(1, _vae.ATTN_CHUNK_SCORES // n))
    upcast = ATTN_UPCAST_COPIES * channels * n * ATTN_SCORE_ITEMSIZE if itemsize < ATTN_SCORE_ITEMSIZE else 0
    return ATTN_TOKEN_COPIES * channels * n * itemsize + upcast + ATTN_SCORE_COPIES * rows * n * ATTN_SCORE_ITEMSIZE


def vae_activation_bytes(cfg: VAEConfig, lat_h: int, lat_w: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of one untiled ``VAEDecoder`` forward on a (1, 4, lat_h,
    lat_w) latent under no_grad, weights not included (the formula is in this module's comments)."""
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"latent size must be positive, got {lat_h}x{lat_w}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    chans = [cfg.ch * m for m in cfg.ch_mult]
    top = chans[-1]
    p = lat_h * lat_w  # pixels at the current level
    # post_quant_conv, conv_in and the mid block, at latent resolution; Mid.forward holds its input
    peak = p * (2 * cfg.z_channels + top) * itemsize
    peak = max(peak, p * _resnet_copies(top, top) * itemsize)
    peak = max(peak, p * top * itemsize + _attention_bytes(top, p, itemsize))
    peak = max(peak, p * (top + _resnet_copies(top, top)) * itemsize)
    ch_in = top
    for level in reversed(range(len(chans))):
        c = chans[level]
        held = ch_in * p  # the level's input, alive until the level returns
        peak = max(peak, _resnet_copies(ch_in, c) * p * itemsize)  # block 0: its input is `held`
        if cfg.num_res_blocks > 0:
            peak = max(peak, (held + _resnet_copies(c, c) * p) * itemsize)
        if level != 0:
            peak = max(peak, (held + c * p + UPSAMPLE_OUTPUT_COPIES * c * 4 * p) * itemsize)
            p *= 4
        ch_in = c
    peak = max(peak, p * (NORM_OUT_COPIES * chans[0] + cfg.out_ch) * itemsize)
    return int(peak * ACTIVATION_MARGIN) + WORKSPACE_BYTES


def tiled_decode_bytes(
    cfg: VAEConfig, lat_h: int, lat_w: int, dtype: torch.dtype, tile: int | None, overlap: int = 8
) -> int:
    """Estimated peak bytes of ``decode_latents(..., tile, overlap)``, weights not included: one
    tile's activations plus the output image it is blended into and the tile's fp32 weighted copy."""
    if tile is None or (tile >= lat_h and tile >= lat_w):
        return vae_activation_bytes(cfg, lat_h, lat_w, dtype)
    th, tw = min(tile, lat_h), min(tile, lat_w)
    f = 2 ** (len(cfg.ch_mult) - 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    output = cfg.out_ch * lat_h * lat_w * f * f * itemsize
    blend = (cfg.out_ch + 1) * th * tw * f * f * 4  # tile * weight in fp32, and the weight itself
    return vae_activation_bytes(cfg, th, tw, dtype) + output + blend


def min_tile(overlap: int = 8) -> int:
    """The smallest tile ``choose_tile`` returns: a multiple of 8, at least 2 * overlap + 8."""
    return -(-(2 * overlap + 8) // 8) * 8


def choose_tile(
    cfg: VAEConfig, lat_h: int, lat_w: int, dtype: torch.dtype, available_bytes: int, overlap: int = 8
) -> int | None:
    """None when a whole decode fits ``available_bytes`` of activations; else the largest tile (a
    multiple of 8 latent pixels, at least ``min_tile(overlap)``) whose tiled decode fits; if none
    does, the smallest allowed tile."""
    if tiled_decode_bytes(cfg, lat_h, lat_w, dtype, None) <= available_bytes:
        return None
    smallest = min_tile(overlap)
    # Tiles of at least max(lat_h, lat_w) are the whole decode, which did not fit.
    for tile in range((max(lat_h, lat_w) - 1) // 8 * 8, smallest - 1, -8):
        if tiled_decode_bytes(cfg, lat_h, lat_w, dtype, tile, overlap) <= available_bytes:
            return tile
    return smallest


# --------------------------------------------------------------------------------------------
# Tiled decode
# --------------------------------------------------------------------------------------------


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride tile - overlap, the last tile flush with the edge."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    starts.append(size - tile)
    return starts


def _axis_weights(size: int, tile: int, starts: list[int], scale: int) -> list[torch.Tensor]:
    """Per-tile blend weights along one axis in pixels (fp32), normalised to sum to 1 everywhere.

    A tile's weight rises linearly across its overlap with the previous tile, from 0.5/width at
    its edge to 1, falls the same way across its overlap with the next, and is 1 elsewhere (image
    borders included). Any overlap width works, so the irregular last tile blends like the rest.
    """
    raw: list[torch.Tensor] = []
    for i, start in enumerate(starts):
        w = torch.ones(tile * scale)
        if i > 0:
            width = (starts[i - 1] + tile - start) * scale  # overlap with the previous tile
            if width > 0:
                w[:width] *= (torch.arange(width) + 0.5) / width
        if i < len(starts) - 1:
            width = (start + tile - starts[i + 1]) * scale  # overlap with the next tile
            if width > 0:
                w[-width:] *= ((torch.arange(width) + 0.5) / width).flip(0)
        raw.append(w)
    total = torch.zeros(size * scale)
    for start, w in zip(starts, raw):
        total[start * scale : (start + tile) * scale] += w
    return [w / total[start * scale : (start + tile) * scale] for start, w in zip(starts, raw)]


@torch.no_grad()
def decode_latents(vae: VAEDecoder, latents: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
    """Decode sampler latents (b, 4, h, w) into images (b, 3, 8h, 8w), as ``vae(latents)`` does.

    ``tile=None``, or a tile at least as large as both sides, is one whole decode. Otherwise the
    latent is cut into ``tile`` x ``tile`` tiles (clipped to the image) overlapping by at least
    ``overlap`` latent pixels, decoded one at a time, and blended into one preallocated output of
    the decode's dtype on the decode's device, so only one tile's activations are ever alive.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be (b, c, h, w), got shape {tuple(latents.shape)}")
    b, _, h, w = latents.shape
    if tile is None or (tile >= h and tile >= w):
        return vae(latents)
    if overlap < 0 or tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}), and overlap at least 0")
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _starts(h, th, overlap), _starts(w, tw, overlap)
    out: torch.Tensor | None = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = vae(latents[:, :, y0 : y0 + th, x0 : x0 + tw])  # (b, 4, th, tw) -> (b, 3, f*th, f*tw)
            if out is None:
                f = part.shape[-1] // tw  # pixels per latent pixel (8 for SD v1)
                out = part.new_zeros(b, part.shape[1], f * h, f * w)
                wy = [t.to(part.device) for t in _axis_weights(h, th, ys, f)]
                wx = [t.to(part.device) for t in _axis_weights(w, tw, xs, f)]
            weight = wy[i][:, None] * wx[j][None, :]  # (f*th,) x (f*tw,) -> (f*th, f*tw), fp32
            out[:, :, f * y0 : f * (y0 + th), f * x0 : f * (x0 + tw)].add_(part * weight)
            del part, weight
    assert out is not None
    return out
