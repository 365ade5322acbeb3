"""Executing plans: staged, streamed, split and tiled renders match the plain one; out-of-memory
in any stage leads to a cheaper plan and a finished image. Runs on the CPU through the same code
path the GPU uses (the 'device' buffers are then CPU tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdterm.engine.events import Notice
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.memory.placement import Placement, get_tensor
from sdterm.engine.memory.streaming import RingStreamer, ring_size
from sdterm.engine.memory.planner import GiB, Plan

from .conftest import oom_on_call, small_request

REQ = dict(width=64, height=48, steps=3, negative="blurry")


def render(model, plan: Plan | None, **kw):
    engine = Engine(open_model(model), "cpu", plan=plan)
    return engine, engine.generate(small_request(**{**REQ, **kw}))


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


@pytest.fixture(scope="module")
def baseline(demo_model):
    return render(demo_model, None)[1]


def _unit_bytes(engine):
    unet = engine.models.module("unet")
    return [sum(p.numel() * p.element_size() for p in m.parameters()) for _, m, _ in unet.units()]


def test_staged_and_resident_match_host(demo_model, baseline):
    for plan in (
        Plan(GiB, text="resident", unet="resident", vae="resident"),
        Plan(GiB, prefetch_unet=True, prefetch_vae=True),
    ):
        engine, r = render(demo_model, plan)
        assert np.array_equal(pixels(r), pixels(baseline)), plan
        # Resident models stay on the 'device' after the render; staged ones don't.
        assert engine.placement.on_device("unet") == (plan.unet == "resident")


def test_streamed_matches_host_with_a_wrapping_ring(demo_model, baseline):
    probe = Engine(open_model(demo_model), "cpu")
    sizes = _unit_bytes(probe)
    resident = frozenset(i for i, b in enumerate(sizes) if b == max(sizes))
    ring = 2 * max(b for i, b in enumerate(sizes) if i not in resident)
    plan = Plan(GiB, unet="streamed", resident_units=resident, ring_bytes=ring)
    engine, r = render(demo_model, plan)
    assert np.array_equal(pixels(r), pixels(baseline))
    assert "streamed" in r.plan


def streamed_unet(demo_model):
    """The demo U-Net, its units (modules) and a CPU placement holding them, for streamers."""
    engine = Engine(open_model(demo_model), "cpu")
    unet = engine.models.module("unet")
    modules = [m for _, m, _ in unet.units()]
    placement = Placement(torch.device("cpu"))
    placement.register("unet", unet, modules)
    return unet, modules, placement


def test_ring_streamer_copies_every_streamed_unit_each_pass(demo_model):
    unet, modules, placement = streamed_unet(demo_model)
    sizes = [u.nbytes for u in placement.models["unet"]]
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.inference_mode():
        expected = unet(x, t, ctx)
        with RingStreamer(placement, "unet", modules, frozenset({0}), 2 * max(sizes), passes=3) as s:
            for _ in range(3):
                assert torch.equal(unet(x, t, ctx), expected)
            # Every streamed unit once per pass, and nothing prefetched past the last pass.
            assert s.copied_bytes == 3 * (sum(sizes) - sizes[0])
            assert s.next == s.total
            with pytest.raises(RuntimeError, match="not prefetched"):
                unet(x, t, ctx)  # a pass nobody planned for is an error, not a silent extra copy
    # Afterwards streamed units point at their host copy again; the resident one stays uploaded.
    for i, unit in enumerate(placement.models["unet"]):
        base = unit.device_buf if i == 0 else unit.host
        assert (unit.device_buf is not None) == (i == 0)
        for slot in unit.slots:
            ptr = get_tensor(slot).data_ptr()
            assert base.data_ptr() <= ptr < base.data_ptr() + unit.nbytes


def test_streamers_one_per_pass_share_the_callers_ring(demo_model):
    """The graphed streamed U-Net runs one streamer per pass through one ring the stage owns:
    every pass is the resident result, every streamed unit is copied into that ring (no ring of
    its own), and a ring smaller than the largest streamed unit is refused."""
    unet, modules, placement = streamed_unet(demo_model)
    sizes = [u.nbytes for u in placement.models["unet"]]
    size = ring_size(placement, "unet", frozenset({0}), 0)
    assert size == max(sizes[1:])
    ring = torch.zeros(2 * size, dtype=torch.uint8)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.inference_mode():
        expected = unet(x, t, ctx)
        for _ in range(3):
            with RingStreamer(placement, "unet", modules, frozenset({0}), 2 * size, 1, ring) as s:
                assert torch.equal(unet(x, t, ctx), expected)
                assert s.ring is ring and s.copied_bytes == sum(sizes) - sizes[0]
        assert ring.any()  # the units' bytes went through the caller's ring (it was zeros)
        with pytest.raises(ValueError, match="a ring of"):
            RingStreamer(placement, "unet", modules, frozenset({0}), 0, 1, ring[: size - 1])


def test_a_streamer_whose_first_copies_fail_leaves_no_hook_behind(demo_model, monkeypatch):
    """A copy refused while the streamer fills its ring on entry (as in a CUDA graph capture that
    cannot copy from the host buffers): no hook of it stays on the model, and the next streamer
    (the eager retry of that pass) runs the resident result."""
    unet, modules, placement = streamed_unet(demo_model)
    ring = torch.zeros(2 * ring_size(placement, "unet", frozenset(), 0), dtype=torch.uint8)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)

    def refused(self):
        raise RuntimeError("copy refused")

    with torch.inference_mode():
        expected = unet(x, t, ctx)
        with monkeypatch.context() as m:
            m.setattr(RingStreamer, "_fill", refused)
            with pytest.raises(RuntimeError, match="copy refused"):
                with RingStreamer(placement, "unet", modules, frozenset(), 0, 1, ring):
                    pass
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
        with RingStreamer(placement, "unet", modules, frozenset(), 0, 1, ring):
            assert torch.equal(unet(x, t, ctx), expected)


def test_split_cfg_and_tiled_vae_are_close(demo_model, baseline):
    _, split = render(demo_model, Plan(GiB, split_cfg=True))
    assert np.abs(pixels(split) - pixels(baseline)).max() <= 1
    _, whole = render(demo_model, None, width=256, height=192)
    _, tiled = render(demo_model, Plan(GiB, vae_tile=24), width=256, height=192)
    diff = np.abs(pixels(tiled) - pixels(whole))
    assert diff.mean() < 8  # random weights; tiles only see local context in the mid attention


@pytest.mark.parametrize("stage", ["text", "unet", "vae"])
def test_out_of_memory_in_a_stage_retries_with_a_cheaper_plan(demo_model, baseline, stage):
    engine = Engine(open_model(demo_model), "cpu", plan=Plan(GiB, text="resident", unet="resident", vae="resident"))
    model = engine.models.module(stage)
    model.forward = oom_on_call(model.forward, 2 if stage == "unet" else 1)  # the U-Net: its second step
    notices = []
    steps = []
    from sdterm.engine.events import StepDone

    def emit(e):
        if isinstance(e, Notice):
            notices.append(e.message)
        if isinstance(e, StepDone):
            steps.append(e.step)

    size = dict(width=256, height=192) if stage == "vae" else {}
    r = engine.generate(small_request(**{**REQ, **size}), emit=emit)
    assert any("out of GPU memory" in n and "retrying" in n for n in notices), notices
    if stage == "unet":
        assert steps == [1, 2, 3]  # resumed at the failed step: no step repeated or lost
    if stage != "vae":
        assert np.abs(pixels(r) - pixels(baseline)).max() <= 1
    else:
        assert r.image.size == (256, 192) and "tiled" in r.stages[2].note


def test_oom_with_nothing_cheaper_is_one_clear_error(demo_model):
    from sdterm.engine.pipeline import OutOfMemory

    engine = Engine(open_model(demo_model), "cpu", plan=Plan(GiB, vae_tile=24))
    vae = engine.models.module("vae")

    def always(*a, **k):
        raise torch.cuda.OutOfMemoryError("simulated")

    vae.forward = always
    with pytest.raises(OutOfMemory, match="VAE decoder.*cheapest plan"):
        engine.generate(small_request(**REQ))
    # and the engine recovers for the next render
    vae.forward = type(vae).forward.__get__(vae)
    assert engine.generate(small_request(**REQ)).image.size == (64, 48)


def test_half_precision_unet_units_lay_convolution_weights_out_channels_last():
    """The U-Net's units in fp16 (the GPU's run dtype) hold 4-D weights as channels-last views of
    their bytes, with the values unchanged; other models, and fp32, stay NCHW."""
    from torch import nn

    from sdterm.engine.memory.placement import Placement, channels_last

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 6, 1)).half()
    want = {k: v.clone() for k, v in conv.state_dict().items()}
    placement = Placement(torch.device("cpu"))
    placement.register("unet", conv, list(conv))
    for k, v in conv.state_dict().items():
        assert torch.equal(v, want[k]), k
        if v.dim() == 4:
            assert v.is_contiguous(memory_format=torch.channels_last), k
            assert not v.is_contiguous() or v.shape[-2:] == (1, 1), k  # a 1x1 kernel is both
    assert channels_last("unet", torch.float16) and not channels_last("unet", torch.float32)
    assert channels_last("vae", torch.float16) and not channels_last("vae_encoder", torch.float16)
    encoder = nn.Sequential(nn.Conv2d(4, 8, 3)).half()
    placement.register("vae_encoder", encoder)
    assert encoder[0].weight.is_contiguous()


def test_bind_points_every_tensor_where_slot_view_does():
    """``Unit.bind`` (the fast path a streamed U-Net takes every step) gives each tensor exactly
    :func:`slot_view`'s place, shape and strides, channels-last ones included, at any ALIGN start."""
    from torch import nn

    from sdterm.engine.memory.placement import ALIGN, Unit, get_tensor, slot_view

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8), nn.Linear(8, 5), nn.BatchNorm1d(5)).half()
    unit = Unit([block], pin=False, last=True)
    flat = torch.zeros(unit.nbytes + 3 * ALIGN, dtype=torch.uint8)
    for start in (0, ALIGN, 3 * ALIGN):
        unit.bind(flat, start)
        for slot in unit.slots:
            t, want = get_tensor(slot), slot_view(flat, start, slot)
            assert (t.data_ptr(), t.shape, t.stride(), t.dtype) == (want.data_ptr(), want.shape, want.stride(),
                                                                    want.dtype), slot.name
    unit.bind(unit.host)
    assert all(get_tensor(s).data_ptr() == slot_view(unit.host, 0, s).data_ptr() for s in unit.slots)


def test_a_unit_bound_during_inference_keeps_ordinary_tensors():
    """A streamed U-Net's units are bound inside the render's inference mode (every pass); their
    tensors must stay ordinary ones, or the model can't be used outside it afterwards (bench's
    diffusers reference took them as parameters: "Setting requires_grad=True on inference tensor")."""
    from torch import nn

    from sdterm.engine.memory.placement import Unit, get_tensor

    block = nn.Sequential(nn.Conv2d(4, 8, 3), nn.GroupNorm(2, 8)).half()
    unit = Unit([block], pin=False)
    with torch.inference_mode():
        ring = torch.zeros(unit.nbytes, dtype=torch.uint8)
        unit.bind(ring)
        block(torch.zeros(1, 4, 5, 5, dtype=torch.float16))
        unit.bind(unit.host)
    assert not any(get_tensor(s).is_inference() for s in unit.slots)
    nn.Conv2d(4, 8, 3).load_state_dict(block[0].state_dict(), assign=True)  # raised before the fix
