"""GroupNorm that keeps its input's memory layout and spreads its statistics over the whole GPU.

PyTorch's CUDA GroupNorm has two costs that matter here (torch 2.11, H100, fp16; measured with
torch.profiler on full-size SD v1 weights):

- it computes each (sample, group)'s moments in one thread block: a VAE decode at 512x512 has
  batch 1 and 32 groups, so 32 blocks reduce about a million values each on a 132-SM card. That
  kernel was 11 ms of a 22-28 ms decode;
- it works on contiguous (NCHW) tensors only, so a channels-last input (the layout the U-Net's and
  the VAE's convolutions run fastest in) is copied to NCHW and the result copied back for the next
  convolution: 122 copies a U-Net step, 7.4 ms of a channels-last decode.

Here the moments are one ``var_mean`` over a view that keeps the input's layout (PyTorch's
reductions split a long reduction over many blocks), folded into a per-channel scale and shift,
then one ``addcmul`` over the input, which keeps its layout. Same parameters, names and state dict
as ``nn.GroupNorm``; the same arithmetic up to rounding (in half precision the mean and variance
are rounded to half, as PyTorch's own half kernel rounds its mean and 1/std).

Small groups stay with PyTorch's kernel: below about 8K values a group, its one block a group is
quick and the five small kernels here cost more (H100, fp16, channels-last, graphed, copies
included: 640 ch at 16x16 13-18 us against 52; 320 ch at 64x64 54-75 us against 36-41).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPREAD_MIN_GROUP = 8192
"""Values per (sample, group) from which :func:`group_norm` uses its own arithmetic on CUDA."""


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` for a 4-D ``x`` in NCHW or channels-last
    layout, returned in ``x``'s layout, on a CUDA device; anything else goes to ``F.group_norm``
    (on the CPU that kernel is the faster one: 3-20x on 2 cores), and so do small groups."""
    if spread_pays(x, groups):
        return spread_group_norm(x, groups, weight, bias, eps)
    return F.group_norm(x, groups, weight, bias, eps)


def spread_pays(x: torch.Tensor, groups: int) -> bool:
    """Whether :func:`spread_group_norm` is the faster way to normalize ``x``: on a CUDA device,
    for a 4-D input whose groups hold at least ``SPREAD_MIN_GROUP`` values."""
    return (x.device.type == "cuda" and x.dim() == 4
            and x.numel() // max(1, x.shape[0] * groups) >= SPREAD_MIN_GROUP)


def spread_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    """:func:`group_norm`'s own arithmetic, on any device (the tests run it on the CPU)."""
    if x.dim() != 4 or weight is None or bias is None:
        return F.group_norm(x, groups, weight, bias, eps)
    n, c, h, w = x.shape
    if x.is_contiguous():  # (n, c, h, w): a group is one contiguous run
        var, mean = torch.var_mean(x.view(n, groups, -1), dim=2, correction=0)
    elif x.is_contiguous(memory_format=torch.channels_last):  # (n, h, w, c) in memory
        var, mean = torch.var_mean(x.permute(0, 2, 3, 1).view(n, h * w, groups, c // groups), dim=(1, 3),
                                   correction=0)
    else:
        return F.group_norm(x, groups, weight, bias, eps)
    # y = (x - mean) * rstd * weight + bias = x * scale + shift, per (sample, channel)
    scale = weight.view(groups, -1) * torch.rsqrt(var + eps)[:, :, None]  # (n, groups, c / groups)
    shift = torch.addcmul(bias.view(groups, -1), mean[:, :, None], scale, value=-1)
    return torch.addcmul(shift.view(n, c, 1, 1), x, scale.view(n, c, 1, 1))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) computed by :func:`group_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


__all__ = ["SPREAD_MIN_GROUP", "GroupNorm", "group_norm", "spread_group_norm", "spread_pays"]
