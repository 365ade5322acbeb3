"""The first-call warm-up (engine/model_warm.py): its stand-ins have the real models' tensor layout
(what the kernels' plans are keyed by), and its U-Net inputs have the signatures of the calls a
render makes (what the CUDA graphs are keyed by). Its effect on the GPU is in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from sdterm.engine.loading.demo import demo_config
from sdterm.engine.loading.host_units import model_sizes, stage_units
from sdterm.engine.memory.graphs import signature
from sdterm.engine.memory.placement import ALIGN, Unit, channels_last
from sdterm.engine.model_warm import stand_in, warm_inputs
from sdterm.engine.networks.unet import UNetModel
from sdterm.engine.networks.vae import VAEDecoder
from sdterm.engine.pipeline import Engine, open_model
from tests.conftest import small_request

pytestmark = pytest.mark.usefixtures("one_thread")


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("stage", ["unet", "vae"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_stand_in_is_laid_out_as_the_placement_lays_out_the_model(stage, dtype):
    cfg = demo_config(64)
    real = (UNetModel(cfg.unet) if stage == "unet" else VAEDecoder(cfg.vae)).to(dtype).eval()
    # packed as the placement packs a model for the device
    units = {}
    for module in stage_units(stage, real):
        unit = Unit([module], pin=False, last=channels_last(stage, dtype))
        units.update((id(t), unit) for t in tensors(module).values())
    twin = stand_in(stage, cfg, dtype, torch.device("cpu"))
    want, got = tensors(real), tensors(twin)
    assert want.keys() == got.keys()
    # One buffer, the largest unit's bytes: each tensor where it sits in its own unit.
    sizes = model_sizes(cfg, dtype)
    largest = max(n for _, n, _ in sizes.units) if stage == "unet" else sizes.vae
    base = min(t.data_ptr() for t in got.values())
    assert max(t.data_ptr() + t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
               for t in got.values()) - base <= largest
    for name, t in want.items():
        s = got[name]
        assert (s.shape, s.dtype, s.stride(), s.device.type) == (t.shape, t.dtype, t.stride(), "cpu"), name
        assert s.data_ptr() - base == t.data_ptr() - units[id(t)].host.data_ptr(), name
        assert (s.data_ptr() - base) % ALIGN == 0 and not s.requires_grad, name
    if dtype == torch.float16:  # the convolutions channels-last, as on the GPU
        assert any(t.dim() == 4 and not t.is_contiguous() for t in got.values())


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DDIM", "UniPC", "DPM++ SDE", "LCM"])
@pytest.mark.parametrize("case", [
    dict(cfg=7.5),  # cond and uncond in one batch of two
    dict(cfg=7.5, prompt="a red fox " * 30),  # more tokens than the negative: two passes
    dict(cfg=1.0),  # the prompt alone
])
def test_warm_inputs_have_the_signatures_of_a_renders_unet_calls(demo_model, sampler, case):
    engine = Engine(open_model(demo_model), "cpu")
    seen, args = set(), []
    acquire = engine._acquire_unet
    engine._acquire_unet = lambda *a: args.append(a) or acquire(*a)
    unet = engine.models.module("unet")
    unet.register_forward_pre_hook(lambda _m, inputs: seen.add(signature(*inputs)))
    engine.generate(small_request(sampler=sampler, steps=4, width=64, height=48, **case))
    req, cond, uncond, _plan, split, x_t = args[0]
    inputs = warm_inputs(engine.models.cfg, req.cfg, split, cond.segments[0], uncond.segments[0], x_t,
                         torch.device("cpu"))
    assert {signature(*i) for i in inputs} == seen
    assert len(inputs) == len(seen)  # each signature once
