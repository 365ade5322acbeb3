"""Tiled VAE decoding (and encoding) under a memory budget, and the activation estimates that size the tiles.

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

Encoding is the mirror image: ``encode_images`` cuts the image into overlapping pixel tiles on
the latent grid (tile and overlap counted in latent pixels, as for decoding), encodes them one at
a time and blends the latent tiles with the same weights; ``encoder_activation_bytes`` is the
encoder's count.
"""

from __future__ import annotations

import torch

from ...config import VAEConfig
from ..networks import vae as _vae
from ..networks.vae import VAEDecoder, VAEEncoder

# --------------------------------------------------------------------------------------------
# Activation estimate
# --------------------------------------------------------------------------------------------
#
# The count follows the eager forward pass under no_grad, op by op: a tensor is alive while a
# Python name or an argument in some frame still refers to it. Sizes are in "channel-pixels" at
# the op's resolution p (channels x pixels; bytes = that x itemsize). C_i = ch * ch_mult[i]; level
# i runs at p_i = h*w * 4^(L-1-i) pixels (L = len(ch_mult), so level 0 is the full 8h x 8w).
# Every convolution also holds CONV_LAYOUT_COPIES * (in + out) scratch: cuDNN runs NCHW fp16/fp32
# convolutions in NHWC and converts both sides.
#
#   ResnetBlock(Cin -> Cout), with the caller's extra live tensors H:
#     norm1, silu:  H + 3 Cin                      (x, norm1(x), silu(norm1(x)))
#     conv1:        H + 2 Cin + Cout + k (Cin + Cout)
#     norm2, silu:  H + Cin + 3 Cout               (x, h, norm2(h), silu(...))
#     conv2:        H + Cin + 3 Cout + 2 k Cout
#     nin_shortcut: H + Cin + 2 Cout + k (Cin + Cout)   (only when Cin != Cout)
#     the sum:      H + Cin + 3 Cout               (x, conv2 out, shortcut, sum)
#   Decoder.forward keeps each level's input alive (``h = level(h)``) until the level returns: H for
#   every block but the first, whose input it is.
#   Upsample(C), p -> 4p: H + C p + (2 + 2k) C 4p  (input, interpolated, conv output, scratch)
#   Output: 3 C_0 (level 0's output, norm_out, silu), then 2 C_0 + 3 + k (C_0 + 3) for conv_out.
#   Mid attention at n = h*w tokens, C = C_(L-1), bytes:
#     ATTN_TOKEN_COPIES C n itemsize                        (x, q, k, v, output, projection)
#     + ATTN_UPCAST_COPIES C n 4                            (k, v in fp32; fp16/bf16 only)
#     + ATTN_CHUNK_COPIES rows C 4 + ATTN_SCORE_COPIES rows n ATTN_SCORE_ITEMSIZE
#     with rows = n, or ATTN_CHUNK_SCORES // n past ATTN_CHUNK_THRESHOLD tokens (vae.py). This is
#     SDPA's math kernel, which is what runs: q/k/v are transposed views (last-dim stride != 1),
#     which every fused kernel declines, and flash would need a head width <= 256 anyway.
#
# For SD v1 (ch 128, ch_mult 1 2 4 4) the peak is up.1's upsample conv: up.1's 512-channel input
# (128 at full resolution), its 256-channel output (64), the interpolated tensor and the conv
# output (256 each) and their NHWC copies (256 each): 1216 channel-pixels at 8h x 8w, 608 MiB at
# 512x512 in fp16. Measured on an H200 (torch 2.11, cuDNN, fp16 and fp32, 64x64 to 160x160 latents):
# max_memory_allocated agreed with this count within 1% (the first decode in a process adds ~32 MiB
# of cuDNN/cuBLAS workspace). With the model in channels_last the scratch disappears (k = 0, 1.17x
# fewer bytes) but the decode ran ~1.7x slower; with cuDNN disabled it took 3.9x the count.

CONV_LAYOUT_COPIES = 1
"""Extra copies of each convolution's input and output alive while it runs (cuDNN's NCHW <-> NHWC
conversion; 0 on the CPU or for a channels_last model)."""
ATTN_TOKEN_COPIES = 6
"""Mid attention tensors of (top channels x h*w) in the run dtype: x, q, k, v, output, projection."""
ATTN_UPCAST_COPIES = 2
"""fp32 copies of the whole k and v that the math kernel makes for fp16/bf16 inputs."""
ATTN_CHUNK_COPIES = 3
"""fp32 tensors of one query chunk in the math kernel: the (upcast) queries, scaled, the output."""
ATTN_SCORE_COPIES = 2
"""Score matrices alive in SDPA's math kernel: q k^T and its softmax."""
ATTN_SCORE_ITEMSIZE = 4
"""Bytes per score: the math kernel computes fp16/bf16 attention in fp32 (PyTorch's default)."""
ACTIVATION_MARGIN = 1.05
"""Multiplier over the count: allocator rounding and fragmentation, small tensors it leaves out."""
WORKSPACE_BYTES = 64 * 2**20
"""Fixed bytes on top: cuDNN/cuBLAS workspaces (measured ~32 MiB on the first decode of a process)."""


def _resnet_peak(cin: int, cout: int, held: int, shortcut: bool) -> int:
    """Peak channel-pixels of one ResnetBlock whose caller keeps ``held`` more alive."""
    k = CONV_LAYOUT_COPIES
    live = [
        3 * cin,
        2 * cin + cout + k * (cin + cout),
        cin + 3 * cout + 2 * k * cout,
        cin + 3 * cout,
    ]
    if shortcut:
        live.append(cin + 2 * cout + k * (cin + cout))
    return held + max(live)


def _attention_bytes(channels: int, n: int, itemsize: int) -> int:
    """Peak bytes inside the mid-block AttnBlock (its input included) for n tokens."""
    rows = n if n <= _vae.ATTN_CHUNK_THRESHOLD else min(n, max(1, _vae.ATTN_CHUNK_SCORES // n))
    upcast = ATTN_UPCAST_COPIES * channels * n * 4 if itemsize < 4 else 0
    chunk = ATTN_CHUNK_COPIES * rows * channels * 4 + ATTN_SCORE_COPIES * rows * n * ATTN_SCORE_ITEMSIZE
    return ATTN_TOKEN_COPIES * channels * n * itemsize + upcast + chunk


def vae_activation_bytes(cfg: VAEConfig, lat_h: int, lat_w: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of one untiled ``VAEDecoder`` forward on a (1, 4, lat_h,
    lat_w) latent under no_grad, weights not included; a batch of b needs b times the count.

    The model and its measurement are in the comments above: ``ACTIVATION_MARGIN`` times the op
    by op count, plus ``WORKSPACE_BYTES``.
    """
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"latent size must be positive, got {lat_h}x{lat_w}")
    itemsize = dtype.itemsize
    k = CONV_LAYOUT_COPIES
    chans = [cfg.ch * m for m in cfg.ch_mult]
    top, z = chans[-1], cfg.z_channels
    p = lat_h * lat_w  # pixels at the current level
    # post_quant_conv and conv_in; then the mid block, whose input (conv_in's output) Mid.forward holds
    peak = p * (z + z + top + k * (z + top)) * itemsize
    peak = max(peak, p * _resnet_peak(top, top, 0, False) * itemsize)
    peak = max(peak, p * top * itemsize + _attention_bytes(top, p, itemsize))
    peak = max(peak, p * _resnet_peak(top, top, top, False) * itemsize)
    ch_in = top
    for level in reversed(range(len(chans))):
        c = chans[level]
        held = ch_in * p  # the level's input, alive until the level returns
        peak = max(peak, p * _resnet_peak(ch_in, c, 0, ch_in != c) * itemsize)
        if cfg.num_res_blocks > 0:
            peak = max(peak, (held + p * _resnet_peak(c, c, 0, False)) * itemsize)
        if level != 0:
            peak = max(peak, (held + c * p + (2 + 2 * k) * c * 4 * p) * itemsize)
            p *= 4
        ch_in = c
    c0, out = chans[0], cfg.out_ch
    peak = max(peak, p * max(3 * c0, 2 * c0 + out + k * (c0 + out)) * itemsize)
    return int(peak * ACTIVATION_MARGIN) + WORKSPACE_BYTES


# The encoder, counted the same way (the input image is the caller's and not counted). At level i
# (H_i x W_i pixels, p_i = H_i W_i, Cin = the previous level's channels, 3 -> C_0 for conv_in):
#   conv_in:       C_0 + k (3 + C_0)
#   blocks:        as in the decoder, the level's input held (``h = level(h)``) past its first block
#   Downsample(C): H + C p + C (H_i+1)(W_i+1) + C p/4 + k (C (H_i+1)(W_i+1) + C p/4)
#                  (the last block's output, the padded copy, the stride-2 output, scratch)
#   mid:           as in the decoder; then 3 C or 2 C + 2z + k (C + 2z) for norm_out/conv_out at the
#                  bottom, and quant_conv's 2z + 2z + 4kz, the mean's z.
# For SD v1 the peak is down.0's downsample: 128 channels held, 128 in x, 128 padded, 32 out,
# 160 scratch: ~580 channel-pixels at full resolution (an estimate from the count, not measured
# on a GPU yet).


def encoder_activation_bytes(cfg: VAEConfig, lat_h: int, lat_w: int, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes of one untiled ``VAEEncoder`` forward on a (1, 3, f*lat_h,
    f*lat_w) image (f = 2^(len(ch_mult) - 1)) under no_grad, weights and the input not included;
    a batch of b needs b times the count. ``ACTIVATION_MARGIN`` times the count above, plus
    ``WORKSPACE_BYTES``."""
    if lat_h < 1 or lat_w < 1:
        raise ValueError(f"latent size must be positive, got {lat_h}x{lat_w}")
    itemsize = dtype.itemsize
    k = CONV_LAYOUT_COPIES
    chans = [cfg.ch * m for m in cfg.ch_mult]
    top, z2 = chans[-1], 2 * cfg.z_channels
    f = 2 ** (len(chans) - 1)
    h, w = f * lat_h, f * lat_w
    peak = h * w * (chans[0] + k * (cfg.out_ch + chans[0]))  # conv_in, in channel-pixels
    ch_in = chans[0]
    for level, c in enumerate(chans):
        p = h * w
        held = ch_in * p  # the level's input, alive until the level returns
        peak = max(peak, p * _resnet_peak(ch_in, c, 0, ch_in != c))
        for _ in range(cfg.num_res_blocks - 1):
            peak = max(peak, held + p * _resnet_peak(c, c, 0, False))
        if level != len(chans) - 1:
            padded, out = c * (h + 1) * (w + 1), c * (h // 2) * (w // 2)
            last = c * p if cfg.num_res_blocks > 0 else 0
            peak = max(peak, held + last + padded + out + k * (padded + out))
            h, w = h // 2, w // 2
        ch_in = c
    p = h * w
    peak = max(peak, p * _resnet_peak(top, top, 0, False), p * _resnet_peak(top, top, top, False))
    peak = max(peak, p * max(3 * top, 2 * top + z2 + k * (top + z2), 2 * z2 + 2 * k * z2))
    attention = p * top * itemsize + _attention_bytes(top, p, itemsize)
    return int(max(peak * itemsize, attention) * ACTIVATION_MARGIN) + WORKSPACE_BYTES


def tiled_decode_bytes(
    cfg: VAEConfig, lat_h: int, lat_w: int, dtype: torch.dtype, tile: int | None, overlap: int = 8
) -> int:
    """Estimated peak bytes of ``decode_latents(..., tile, overlap)``, weights not included: one
    tile's activations plus the output image it is blended into and the tile's fp32 weighted copy."""
    if tile is None or (tile >= lat_h and tile >= lat_w):
        return vae_activation_bytes(cfg, lat_h, lat_w, dtype)
    th, tw = min(tile, lat_h), min(tile, lat_w)
    f = 2 ** (len(cfg.ch_mult) - 1)
    itemsize = dtype.itemsize
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


def fp32_decode_tile(cfg: VAEConfig, lat_h: int, lat_w: int, tile: int | None, available: int) -> int | None:
    """The tile for decoding in fp32 with ``available`` bytes for activations: the plan's tile
    if its fp32 decode fits, else the largest one that does (never larger than the plan's)."""
    if tiled_decode_bytes(cfg, lat_h, lat_w, torch.float32, tile) <= available:
        return tile
    fitting = choose_tile(cfg, lat_h, lat_w, torch.float32, available)
    if fitting is None:
        return tile
    return fitting if tile is None else min(tile, fitting)


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
    th, tw, ys, xs = _grid(h, w, tile, overlap)
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


def _grid(h: int, w: int, tile: int, overlap: int) -> tuple[int, int, list[int], list[int]]:
    """Tile height and width (clipped to the latent) and the tiles' origins on each axis, the
    tiled decode's and the tiled encode's grid alike."""
    if overlap < 0 or tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}), and overlap at least 0")
    th, tw = min(tile, h), min(tile, w)
    return th, tw, _starts(h, th, overlap), _starts(w, tw, overlap)


# --------------------------------------------------------------------------------------------
# Tiled encode
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(encoder: VAEEncoder, images: torch.Tensor, tile: int | None = None, overlap: int = 8) -> torch.Tensor:
    """Encode images in [-1, 1] (b, 3, f*h, f*w) into scaled latents (b, 4, h, w), as
    ``encoder(images)`` does (f = ``encoder.factor``, 8 for SD v1).

    ``tile=None``, or a tile at least as large as both latent sides, is one whole encode.
    Otherwise the image is cut into tiles of ``f * tile`` pixels (clipped to the image) whose
    origins lie on the latent grid and which overlap by at least ``f * overlap`` pixels; each is
    encoded alone and its latent blended into the output with the decoder's weights, so only one
    tile's activations are ever alive.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (b, c, h, w), got shape {tuple(images.shape)}")
    f = encoder.factor
    b, _, height, width = images.shape
    if height % f or width % f:
        raise ValueError(f"image sides must be multiples of {f}, got {height}x{width}")
    h, w = height // f, width // f
    if tile is None or (tile >= h and tile >= w):
        return encoder(images)
    th, tw, ys, xs = _grid(h, w, tile, overlap)
    wy, wx = _axis_weights(h, th, ys, 1), _axis_weights(w, tw, xs, 1)
    out: torch.Tensor | None = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = encoder(images[:, :, f * y0 : f * (y0 + th), f * x0 : f * (x0 + tw)])  # -> (b, 4, th, tw)
            if out is None:
                out = part.new_zeros(b, part.shape[1], h, w)
            weight = wy[i].to(part.device)[:, None] * wx[j].to(part.device)[None, :]  # (th, tw), fp32
            out[:, :, y0 : y0 + th, x0 : x0 + tw].add_(part * weight)
            del part, weight
    assert out is not None
    return out


def encode_latents(
    encoder: VAEEncoder, images: torch.Tensor, tile: int | None = None, *, fp32_tile=None
) -> torch.Tensor:
    """The encode the pipeline runs: ``encode_images``, and when a half-precision encode is not
    finite (fp16 overflow), the same encode again in fp32. ``fp32_tile`` (the caller's policy) maps
    the tile to the one its fp32 activations fit (default: the same tile). The fallback converts
    ``encoder`` to fp32 in place, as the VAE stage does with the decoder: the caller puts its
    run-dtype weights back afterwards (it can tell by ``encoder.quant_conv.weight.dtype``)."""
    latents = encode_images(encoder, images, tile)
    if torch.isfinite(latents).all() or latents.dtype == torch.float32:
        return latents
    del latents
    tile = fp32_tile(tile) if fp32_tile is not None else tile
    return encode_images(encoder.float(), images.float(), tile)
