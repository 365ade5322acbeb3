"""The KL-f8 autoencoder, with names that mirror ``first_stage_model.*``.

Two separate modules over the same checkpoint prefix: :class:`VAEDecoder` (``post_quant_conv``,
``decoder``), which every render needs, and :class:`VAEEncoder` (``encoder``, ``quant_conv``),
built only when an image is encoded, so text-to-image never spends memory on it. Both take the
latent scale from ``VAEConfig.scale_factor``: the encoder multiplies by it, the decoder divides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VAEConfig
from .norm import GroupNorm

ATTN_CHUNK_THRESHOLD = 4096
"""Above this many pixel tokens (a 64x64 latent: a 512x512 image) the mid-block attention runs in
query chunks, so that SDPA's math kernel never builds the whole (h*w)^2 score matrix."""
ATTN_CHUNK_SCORES = 4096 * 4096
"""Score-matrix elements per query chunk: rows = ATTN_CHUNK_SCORES // (h*w), at least 1 (64 MiB per
score copy when the math kernel computes in fp32)."""


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm1-SiLU-conv1-norm2-SiLU-conv2 plus a shortcut (``nin_shortcut`` 1x1 when channels change)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels; q/k/v/proj_out are 1x1 convs in the checkpoint."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2)[:, None]  # (b, c, h, w) -> (b, 1, h*w, c)

        q, k, v = tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y))
        del y
        n = h * w
        if n <= ATTN_CHUNK_THRESHOLD:
            out = F.scaled_dot_product_attention(q, k, v)
            out = out[:, 0].transpose(1, 2).reshape(b, c, h, w)  # (b, 1, h*w, c) -> (b, c, h, w)
        else:
            # Each output row softmax(q_i k^T / sqrt(c)) v needs only its own query, so query chunks
            # give the same result while the math kernel holds rows x h*w scores, not (h*w)^2.
            rows = max(1, ATTN_CHUNK_SCORES // n)
            flat = x.new_empty(b, c, n)  # written through a (b, 1, h*w, c) view: no copy at the end
            out_tokens = flat.transpose(1, 2)[:, None]  # (b, c, h*w) -> (b, 1, h*w, c)
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                out_tokens[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v)
            out = flat.view(b, c, h, w)  # (b, c, h*w) -> (b, c, h, w)
        del q, k, v
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class UpLevel(nn.Module):
    """``decoder.up.{i}``: ``block.{0..n}`` then, except at level 0, ``upsample``."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = Mid(top)
        levels: list[UpLevel] = []
        ch = top
        for level in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[level]
            levels.insert(0, UpLevel(ch, out, cfg.num_res_blocks + 1, upsample=level != 0))
            ch = out
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level, run last
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (b, 4, h, w) -> (b, 512, h, w)
        for level in reversed(self.up):
            h = level(h)  # each but the last doubles h and w
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, 128, 8h, 8w) -> (b, 3, 8h, 8w)


class VAEDecoder(nn.Module):
    """Scaled latents -> image in [-1, 1]. Keys: ``post_quant_conv.*`` and ``decoder.*``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.post_quant_conv.weight.dtype
        z = (latents / self.scale_factor).to(dtype)
        return self.decoder(self.post_quant_conv(z))


class Downsample(nn.Module):
    """LDM's downsampling: pad right and bottom by one (asymmetric), then a 3x3 stride-2 conv with
    no padding of its own; (b, c, h, w) -> (b, c, h/2, w/2) for even h and w."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (b, c, h, w) -> (b, c, h+1, w+1) -> (b, c, h/2, w/2)


class DownLevel(nn.Module):
    """``encoder.down.{i}``: ``block.{0..n-1}`` then, except at the last level, ``downsample``."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(n_blocks))
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.out_ch, cfg.ch, 3, padding=1)
        levels: list[DownLevel] = []
        ch = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            levels.append(DownLevel(ch, out, cfg.num_res_blocks, downsample=level != len(cfg.ch_mult) - 1))
            ch = out
        self.down = nn.ModuleList(levels)  # down[0] is the full-resolution level, run first
        self.mid = Mid(ch)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (b, 3, 8h, 8w) -> (b, 128, 8h, 8w)
        for level in self.down:
            h = level(h)  # each but the last halves h and w
        h = self.mid(h)  # (b, 512, h, w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (b, 512, h, w) -> (b, 8, h, w)


class VAEEncoder(nn.Module):
    """Image in [-1, 1] -> scaled latents (the posterior's mean). Keys: ``encoder.*`` and ``quant_conv.*``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.z_channels = cfg.z_channels
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.factor = 2 ** (len(cfg.ch_mult) - 1)
        """Image pixels per latent pixel along each side (8 for SD v1)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.quant_conv.weight.dtype
        moments = self.quant_conv(self.encoder(images.to(dtype)))  # (b, 3, 8h, 8w) -> (b, 8, h, w)
        mean = moments[:, : self.z_channels]  # (b, 8, h, w) -> (b, 4, h, w); the rest is the log-variance
        return mean * self.scale_factor
