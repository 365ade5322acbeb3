"""The layout-keeping GroupNorm (engine/networks/norm.py) against PyTorch's own.

Its CUDA path is the arithmetic of ``spread_group_norm``, run here on the CPU in both layouts;
tests/test_cuda.py runs the models with it on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdterm.engine.loading.demo import demo_config
from sdterm.engine.networks.norm import SPREAD_MIN_GROUP, GroupNorm, group_norm, spread_group_norm, spread_pays
from sdterm.engine.networks.unet import UNetModel
from sdterm.engine.networks.vae import VAEDecoder, VAEEncoder

LAYOUTS = (torch.contiguous_format, torch.channels_last)


def _input(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Each channel with its own mean and spread, so that a wrong grouping changes the result."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(c, generator=g) * 4 + 0.1
    shift = torch.randn(c, generator=g) * 3
    return torch.randn(n, c, h, w, generator=g) * scale[:, None, None] + shift[:, None, None]


@pytest.mark.parametrize("layout", LAYOUTS, ids=("nchw", "channels_last"))
@pytest.mark.parametrize("shape,groups", [((2, 64, 8, 8), 32), ((1, 96, 5, 7), 32), ((3, 12, 4, 6), 4)])
def test_matches_pytorch_group_norm_in_either_layout(layout, shape, groups):
    x = _input(*shape).contiguous(memory_format=layout)
    c = shape[1]
    weight, bias = torch.randn(c) * 2, torch.randn(c)
    want = F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-5)
    got = spread_group_norm(x, groups, weight, bias, 1e-5)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=layout)  # no copy back for the next convolution
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_eps_is_added_to_the_variance():
    """A constant group has variance 0: the result is ``bias`` only if eps sits under the root."""
    x = torch.full((1, 4, 3, 3), 2.0)
    x[:, 2:] = torch.arange(18.0).view(1, 2, 3, 3)
    weight, bias = torch.ones(4), torch.zeros(4)
    eps = 0.25
    got = spread_group_norm(x, 2, weight, bias, eps)
    torch.testing.assert_close(got, F.group_norm(x, 2, weight, bias, eps))
    assert torch.equal(got[:, :2], torch.zeros(1, 2, 3, 3))


def test_half_precision_stays_as_close_as_pytorchs_own():
    """In half precision the moments are rounded to half, as PyTorch's half kernel rounds its
    mean and 1/std: the error against float64 stays of the same order."""
    x = _input(2, 64, 16, 16, seed=3)
    weight, bias = torch.randn(64), torch.randn(64)
    want = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    xh, wh, bh = x.half(), weight.half(), bias.half()
    ours = (spread_group_norm(xh.contiguous(memory_format=torch.channels_last), 32, wh, bh, 1e-6).double()
            - want).abs().max().item()
    theirs = (F.group_norm(xh.float(), 32, wh.float(), bh.float(), 1e-6).half().double() - want).abs().max().item()
    assert ours < 3 * theirs + 1e-3


def test_other_inputs_go_to_pytorch():
    """3-D inputs, missing affine parameters and a layout that is neither: F.group_norm, bit for bit."""
    x3 = torch.randn(2, 8, 10)
    assert torch.equal(spread_group_norm(x3, 4, torch.ones(8), torch.zeros(8), 1e-5),
                       F.group_norm(x3, 4, torch.ones(8), torch.zeros(8), 1e-5))
    x = _input(2, 8, 4, 4)
    assert torch.equal(spread_group_norm(x, 4, None, None, 1e-5), F.group_norm(x, 4, None, None, 1e-5))
    odd = x.permute(0, 1, 3, 2)  # neither NCHW nor channels-last
    assert torch.equal(spread_group_norm(odd, 4, torch.ones(8), torch.zeros(8), 1e-5),
                       F.group_norm(odd, 4, torch.ones(8), torch.zeros(8), 1e-5))


def test_on_the_cpu_the_module_is_pytorchs_kernel():
    """The CPU keeps PyTorch's kernel (the faster one there), so CPU renders are unchanged bit for bit."""
    norm = GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = _input(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))
    assert torch.equal(group_norm(x, 4, norm.weight, norm.bias, 1e-6), norm(x))


def test_own_arithmetic_only_on_cuda_for_large_groups():
    """Large groups (a VAE decode's, the U-Net's top levels) on CUDA; small ones and the CPU keep
    PyTorch's kernel. Shapes only: meta tensors stand for CUDA ones here."""
    big = torch.empty(2, 320, 64, 64, device="meta")  # 40960 values a group
    small = torch.empty(2, 1280, 8, 8, device="meta")  # 2560
    edge = torch.empty(1, 32 * 2, 64, 64, device="meta")  # 2 channels x 4096 = SPREAD_MIN_GROUP
    assert 2 * 64 * 64 == SPREAD_MIN_GROUP

    class OnCuda:  # a tensor that reports a CUDA device, with the shape of another
        def __init__(self, t):
            self.t, self.device = t, torch.device("cuda", 0)

        def __getattr__(self, name):
            return getattr(self.t, name)

    assert spread_pays(OnCuda(big), 32) and spread_pays(OnCuda(edge), 32)
    assert not spread_pays(OnCuda(small), 32)
    assert not spread_pays(OnCuda(torch.empty(2, 320, 4096, device="meta")), 32)  # 3-D
    assert not spread_pays(torch.empty(2, 320, 64, 64), 32)  # the CPU


def test_same_parameters_and_state_dict_as_nn_group_norm():
    ours, theirs = GroupNorm(32, 64, eps=1e-6), nn.GroupNorm(32, 64, eps=1e-6)
    assert isinstance(ours, nn.GroupNorm)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)


def test_the_models_use_it():
    """Every GroupNorm of the U-Net and the VAE is the layout-keeping one."""
    cfg = demo_config(64)
    for model in (UNetModel(cfg.unet), VAEDecoder(cfg.vae), VAEEncoder(cfg.vae)):
        norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(type(m) is GroupNorm for m in norms)
