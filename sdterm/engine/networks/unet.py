"""The SD v1 latent-diffusion U-Net, with attribute names that mirror ``model.diffusion_model.*``.

Because the module tree follows the original checkpoint keys, loading is one strict
``load_state_dict`` with no renaming table. Shapes in comments: b batch, c channels, h/w latent size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...config import UNetConfig
from .attention import SpatialTransformer
from .norm import GroupNorm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps, ``[cos | sin]`` as in the original (b,) -> (b, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between.

    Names: ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}`` (index 2 was dropout),
    ``skip_connection`` (a 1x1 conv, only when the channel count changes).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(32, out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (b, c) -> (b, c, 1, 1), broadcast over h, w
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, named ``op``."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to ``size``: the next skip connection's, when the latent side is
    not a multiple of 8 and a stride-2 conv rounded up on the way down), then a 3x3 conv ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepBlock(nn.ModuleList):
    """One entry of input_blocks/output_blocks: layers that take the embedding or the text as needed."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, up_size: torch.Size | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Predicts the noise in latent ``x`` at timestep ``t`` given text embedding ``context``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc = cfg.model_channels
        emb_dim = mc * 4
        heads, depth, ctx = cfg.num_heads, cfg.transformer_depth, cfg.context_dim
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepBlock([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        levels_in = [0]  # resolution level of each block (0 = full latent resolution)
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, heads, depth, ctx))
                self.input_blocks.append(TimestepBlock(layers))
                levels_in.append(level)
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock([Downsample(ch)]))
                levels_in.append(level)
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepBlock(
            [ResBlock(ch, emb_dim, ch), SpatialTransformer(ch, heads, depth, ctx), ResBlock(ch, emb_dim, ch)]
        )

        self.output_blocks = nn.ModuleList()
        levels_out = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                levels_out.append(level)
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, heads, depth, ctx))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepBlock(layers))

        self.out = nn.Sequential(GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self._levels = (levels_in, len(cfg.channel_mult), levels_out)

    def units(self) -> list[tuple[str, nn.Module, int]]:
        """The layers in execution order, as (name, module, resolution level): what the planner
        keeps resident or streams one by one. Every parameter belongs to exactly one unit."""
        levels_in, deepest, levels_out = self._levels
        out: list[tuple[str, nn.Module, int]] = [("time_embed", self.time_embed, 0)]
        for i, block in enumerate(self.input_blocks):
            out += [(f"input_blocks.{i}.{j}", layer, levels_in[i]) for j, layer in enumerate(block)]
        out += [(f"middle_block.{j}", layer, deepest) for j, layer in enumerate(self.middle_block)]
        for i, block in enumerate(self.output_blocks):
            out += [(f"output_blocks.{i}.{j}", layer, levels_out[i]) for j, layer in enumerate(block)]
        out.append(("out", self.out, 0))
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(b, 4, h, w), (b,), (b, tokens, context_dim) -> (b, 4, h, w) noise estimate."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))  # (b, 4*mc)
        h = x.to(dtype)
        context = context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # skip connection along channels
            # An upsample goes to the next skip's size (2x, or one less where the way down rounded up).
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)
