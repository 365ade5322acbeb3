"""The model cache on a GPU: fp16 units in pinned host buffers, read from the pack straight into
them and adopted by the placement; renders from the pack identical to renders from the file; a
damaged or stale pack is rebuilt. (The CPU tests are in test_model_cache.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdterm.engine.memory.host_memory import page_locked

from sdterm.engine.loading import pack_format
from sdterm.engine.memory.planner import GiB, Plan
from sdterm.engine.pipeline import Engine, open_model

from .conftest import small_request
from .test_model_cache import model, published

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
__all__ = ["model"]  # the fixture, shared with tests/test_model_cache.py

STAGES = ("text", "unet", "vae")
REQ = dict(width=64, height=48, steps=3)


def engine(model: Path, cache: Path | None, plan: Plan | None = None) -> Engine:
    return Engine(open_model(model), "cuda", model_cache=cache, plan=plan)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image)


def test_pack_render_is_identical_with_pinned_adopted_units(model, tmp_path):
    cache = tmp_path / "packs"
    plain = engine(model, None)
    reference = pixels(plain.generate(small_request(**REQ)))
    first = engine(model, cache)
    assert np.array_equal(pixels(first.generate(small_request(**REQ))), reference)
    published()
    assert len(pack_format.pack_files(cache)) == 1
    for plan in (None, Plan(GiB, prefetch_unet=True, prefetch_vae=True)):
        again = engine(model, cache, plan)
        assert again.models._store.pack is not None
        assert np.array_equal(pixels(again.generate(small_request(**REQ))), reference)
        for stage in STAGES:
            a = plain.models.module(stage).state_dict()
            b = again.models.module(stage).state_dict()
            assert all(torch.equal(a[k].cpu(), b[k].cpu()) and a[k].dtype == b[k].dtype for k in a), stage
            hosts = again.models.unit_hosts(stage)
            units = again.placement.models[stage]
            assert all(page_locked(u.host) for u in units), stage
            assert [h.data_ptr() for h in hosts] == [u.host.data_ptr() for u in units], stage
        assert again.models.module("unet").out[2].bias.dtype == torch.float16


def test_checkpoint_load_is_pinned_and_adopted_without_a_pack(model):
    e = engine(model, None)
    e.generate(small_request(**REQ))
    for stage in STAGES:
        units = e.placement.models[stage]
        assert all(page_locked(u.host) for u in units)
        assert [h.data_ptr() for h in e.models.unit_hosts(stage)] == [u.host.data_ptr() for u in units]


@pytest.mark.parametrize("damage", ["truncated", "payload byte", "stale checkpoint"])
def test_damaged_or_stale_pack_is_rebuilt_on_the_gpu(model, tmp_path, damage):
    cache = tmp_path / "packs"
    reference = pixels(engine(model, cache).generate(small_request(**REQ)))
    published()
    pack = pack_format.pack_files(cache)[0]
    if damage == "truncated":
        os.truncate(pack, pack.stat().st_size // 2)
    elif damage == "payload byte":
        fd = os.open(pack, os.O_RDONLY)
        start = pack_format.read_header(fd)[1]
        os.close(fd)
        with open(pack, "r+b") as f:
            f.seek(start + 3)
            b = f.read(1)
            f.seek(start + 3)
            f.write(bytes([b[0] ^ 0x55]))
    else:
        time.sleep(0.02)
        os.utime(model / "model.safetensors")  # same bytes, but no longer provably the same file
    second = engine(model, cache)
    assert np.array_equal(pixels(second.generate(small_request(**REQ))), reference)
    published()
    third = engine(model, cache)
    assert third.models._store.pack is not None
    assert np.array_equal(pixels(third.generate(small_request(**REQ))), reference)


def test_first_pass_render_is_identical_with_pinned_adopted_units(model, tmp_path, monkeypatch):
    """A first use read in one pass (forced here below its size threshold): the U-Net and VAE
    decoder built on the pass's threads, page-locked there, adopted by the placement; the render,
    the hash and the pack are those of the model-by-model path."""
    from sdterm.engine.loading import models as models_mod

    reference = pixels(engine(model, None).generate(small_request(**REQ)))
    monkeypatch.setattr(models_mod, "SINGLE_PASS_BYTES", 0)
    cache = tmp_path / "packs"
    first = engine(model, cache)
    assert first.models._store.first_pass is not None
    result = first.generate(small_request(**REQ))
    assert np.array_equal(pixels(result), reference)
    for stage in STAGES:
        units = first.placement.models[stage]
        assert all(page_locked(u.host) for u in units), stage
        assert [h.data_ptr() for h in first.models.unit_hosts(stage)] == [u.host.data_ptr() for u in units], stage
    published()
    again = engine(model, cache)
    assert again.models._store.pack is not None and again.models.sha256 == first.models.sha256
    assert np.array_equal(pixels(again.generate(small_request(**REQ))), reference)


def test_a_render_thread_warmed_while_the_pack_is_read_renders_the_same_image(model, tmp_path, monkeypatch):
    """``sdterm generate`` on a GPU (render_thread.py): the engine's head start (``warm_for``:
    the U-Net read from the pack on a thread, the attention's plans on the render thread, then the
    resident U-Net uploaded and its graph captured, the VAE uploaded and called), then the render
    on that thread: it only replays that graph, and the image is the plain engine's."""
    from sdterm.engine.networks.unet import UNetModel
    from sdterm.engine.render_thread import RenderThread

    cache = tmp_path / "packs"
    reference = pixels(engine(model, cache).generate(small_request(**REQ)))
    published()
    warmed = engine(model, cache)
    assert warmed.models.from_cache("unet")
    thread = RenderThread()
    calls = []
    forward = UNetModel.forward
    monkeypatch.setattr(UNetModel, "forward", lambda self, *a: calls.append(
        torch.cuda.is_current_stream_capturing()) or forward(self, *a))
    thread.submit(warmed.warm_for, small_request(**REQ))
    thread.call(lambda: None)  # the head start is done
    assert all(warmed.placement.device_bytes(stage) > 0 for stage in ("unet", "vae"))
    uploaded = {stage: [u.device_buf.data_ptr() for u in warmed.placement.models[stage]] for stage in ("unet", "vae")}
    assert calls == [False, True] and warmed.unet_graphs.captures == 1  # the warm-up, then the capture
    result = thread.call(warmed.generate, small_request(**REQ))
    assert calls == [False, True] and warmed.unet_graphs.captures == 1  # the render only replayed it
    # The render used the weights the head start uploaded (a resident plan: still where they were).
    assert uploaded == {stage: [u.device_buf.data_ptr() for u in warmed.placement.models[stage]] for stage in uploaded}
    assert np.array_equal(pixels(result), reference)
