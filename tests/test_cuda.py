"""GPU checks (skipped without CUDA): streams, budgets, retries and figures on a real device.

The CPU suite runs the same code paths, but on the CPU every copy is synchronous: only here can a
test see a copy still in flight, memory reused under it, or the allocator's counters.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sdterm.config import ModelConfig
from sdterm.engine import pipeline
from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.events import Notice
from sdterm.engine.memory.placement import Placement
from sdterm.engine.memory.planner import GiB, MiB, Plan
from sdterm.engine.memory.streaming import RingStreamer
from sdterm.engine.memory.tiling import decode_latents
from sdterm.engine.pipeline import Engine, ModelSource, open_model, to_image
from sdterm.engine.sampling import ddim

from .conftest import oom_on_call, small_request
from .test_engine import SEED3_64x64_NOISE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PATTERN = 0xA5


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


def fresh_allocation_intact(placement: Placement, nbytes: int = 512 * MiB) -> bool:
    """Allocate (reusing whatever was just freed), fill, let any copy still queued on the side
    stream land, read back: a copy into freed memory shows as overwritten bytes."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    x.fill_(PATTERN)
    placement.copy_stream.synchronize()
    torch.cuda.synchronize()
    intact = bool((x == PATTERN).all())
    del x
    return intact


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Full-size SD v1 with random weights (one engine, built once; plans change per render)."""
    from sdterm.engine.loading.demo import write_tokenizer

    tok = tmp_path_factory.mktemp("tok")
    write_tokenizer(tok)
    return ModelSource(None, ModelConfig(), "sd-v1-random", tok)


# ---- streams -------------------------------------------------------------------------------------


def ring_corruption(passes: int = 3, n_layers: int = 12, width: int = 4096) -> int:
    """The review's reproduction, driven directly: a stack of fp16 layers streamed through a ring
    for ``passes`` passes; then a fresh allocation of the ring's size is zeroed and, once the copy
    stream has drained, checked. Returns how many bytes were overwritten (0 = correct)."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(width, width, bias=False).half() for _ in range(n_layers))
    placement = Placement(torch.device("cuda"))
    placement.register("stack", layers, list(layers))
    unit_bytes = placement.models["stack"][0].nbytes
    ring_bytes = 3 * unit_bytes
    x = torch.randn(1, width, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        with RingStreamer(placement, "stack", list(layers), frozenset(), ring_bytes, passes):
            for _ in range(passes):
                h = x
                for layer in layers:
                    h = layer(h)
        fresh = torch.empty(ring_bytes, dtype=torch.uint8, device="cuda")
        fresh.zero_()
        placement.copy_stream.synchronize()
        torch.cuda.synchronize()
        bad = int((fresh != 0).sum())
    del fresh
    placement.offload_all()
    torch.cuda.empty_cache()  # with a copy in flight into released memory, this is where CUDA died
    torch.cuda.synchronize()
    return bad


def test_streamed_ring_leaves_no_copy_behind():
    for _ in range(3):
        assert ring_corruption() == 0


def test_streamed_render_leaves_no_pending_copy_and_no_memory(full_size, monkeypatch):
    engine = Engine(full_size, "cuda", budget=GiB)
    req = small_request(width=512, height=512, steps=4)
    engine.generate(req)  # warm-up: cuBLAS workspace, cached embeddings
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    seen: list[RingStreamer] = []
    real = pipeline.RingStreamer

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(pipeline, "RingStreamer", spy)
    r = engine.generate(req)
    assert "streamed" in r.plan and len(seen) == 1
    s = seen[0]
    # Only the compute stream is waited on: the join at the stage's end covers every copy.
    torch.cuda.current_stream().synchronize()
    assert s.last_copy is not None and s.last_copy.query()
    assert engine.placement.copy_stream.query()
    assert s.next == s.total == req.steps * len(s.order)  # no prefetch past the last pass
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline


def test_plans_give_the_resident_pixels_three_renders_in_a_row(full_size):
    """Resident, staged (prefetching) and streamed, 512x512, eta 0.5, three rounds in one process,
    a fresh allocation of the just-freed memory checked after every render."""
    engine = Engine(full_size, "cuda")
    req = small_request(width=512, height=512, steps=6, eta=0.5, negative="blurry")
    plans = {"resident": None, "staged": 2 * GiB, "streamed": GiB}
    reference = None
    for _round in range(3):
        for name, budget in plans.items():
            engine.set_budget(budget)
            r = engine.generate(req)
            assert name in r.plan, (name, r.plan)
            assert fresh_allocation_intact(engine.placement), (name, _round)
            if reference is None:
                reference = pixels(r)
            else:
                assert np.abs(pixels(r) - reference).max() <= 2, (name, _round)


# ---- budgets, retries, fallbacks -----------------------------------------------------------------


@pytest.mark.parametrize("budget", [GiB, 2 * GiB])
def test_budget_is_respected_with_full_size_weights(full_size, budget):
    engine = Engine(full_size, "cuda", budget=budget)
    r = engine.generate(small_request(width=512, height=512, steps=3))
    for s in r.stages:
        assert s.peak_allocated <= budget, (s.stage, s.peak_allocated / MiB, r.plan)


@pytest.mark.parametrize("stage", ["text", "unet", "vae"])
def test_out_of_memory_in_each_stage_with_eta_gives_the_same_pixels(demo_model, stage):
    plan = Plan(GiB, prefetch_unet=True, prefetch_vae=True)
    req = small_request(width=256, height=192, steps=5, eta=0.5, negative="blurry")
    base = Engine(open_model(demo_model), "cuda", plan=plan).generate(req)
    engine = Engine(open_model(demo_model), "cuda", plan=plan)
    model = engine.models.module(stage)
    model.forward = oom_on_call(model.forward, 3 if stage == "unet" else 1)
    notices: list[str] = []
    r = engine.generate(req, emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any("retrying" in n for n in notices), notices
    assert torch.equal(r.latents, base.latents)
    if stage != "vae":  # the VAE retry decodes in tiles: same latents, pixels within blending
        assert np.array_equal(pixels(r), pixels(base))
    else:
        assert np.abs(pixels(r) - pixels(base)).mean() < 8
    assert fresh_allocation_intact(engine.placement)


def test_same_seed_same_noise_on_cuda(demo_model, monkeypatch):
    """The starting noise is drawn on the CPU: a CUDA render starts from the recorded values."""
    started = []
    real = ddim.sample

    def spy(denoise, x, *args, **kwargs):
        started.append(x.detach().cpu().clone())
        return real(denoise, x, *args, **kwargs)

    monkeypatch.setattr(ddim, "sample", spy)
    Engine(open_model(demo_model), "cuda").generate(small_request(seed=3, width=64, height=64))
    assert started[0].device.type == "cpu" and started[0].dtype == torch.float32
    assert started[0].flatten()[:4].tolist() == pytest.approx(SEED3_64x64_NOISE, abs=1e-7)


def test_fp16_overflow_in_the_vae_is_decoded_again_in_fp32_on_cuda(demo_model):
    engine = Engine(open_model(demo_model), "cuda")
    vae = engine.models.module("vae")
    with torch.no_grad():  # the first conv overflows fp16 (65504), not fp32
        vae.decoder.conv_in.weight.mul_(3000.0)
        vae.decoder.conv_in.bias.mul_(3000.0)
    reference = copy.deepcopy(vae).float().cuda()
    notices: list[str] = []
    r = engine.generate(small_request(width=128, height=128),
                        emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    with torch.inference_mode():
        z = r.latents.cuda()
        assert not torch.isfinite(decode_latents(copy.deepcopy(reference).half(), z.half())).all()
        expected = np.asarray(to_image(decode_latents(reference, z.float()))).astype(int)
    assert sum("fp32" in n for n in notices) == 1, notices
    assert np.abs(pixels(r) - expected).max() <= 2
    assert pixels(r).std() > 10
    again = engine.generate(small_request(width=128, height=128))  # the fp16 model is back in place
    assert np.array_equal(pixels(again), pixels(r))


# ---- figures ---------------------------------------------------------------------------------------


def test_cuda_render_reports_peaks_and_returns_memory(demo_model, tmp_path):
    engine = Engine(open_model(demo_model), "cuda", cache=EmbeddingCache(tmp_path))
    assert engine.dtype == torch.float16
    baseline = torch.cuda.memory_allocated()
    first = engine.generate(small_request(width=128, height=128))
    for s in first.stages:
        assert s.peak_allocated and s.peak_reserved and s.device_total and s.device_free is not None
        assert s.resident_end <= baseline + 64 * 2**20  # the model went back to the host
        assert s.load_seconds >= 0 and s.run_seconds > 0
    again = engine.generate(small_request(width=128, height=128))
    assert first.image.tobytes() == again.image.tobytes()
    text = again.stages[0]
    assert text.cache == "hit" and text.skipped
    assert text.peak_allocated == text.resident_start  # not one byte allocated by the text stage
    assert torch.cuda.memory_allocated() <= baseline + 64 * 2**20


def test_allocated_memory_returns_to_baseline_after_every_render(demo_model, tmp_path):
    """Staged models leave the device after each render; nothing accumulates over many renders."""
    engine = Engine(open_model(demo_model), "cuda", plan=Plan(GiB, prefetch_unet=True, prefetch_vae=True),
                    cache=EmbeddingCache(tmp_path))
    engine.generate(small_request())  # warm-up: cuBLAS/cuDNN workspaces
    baseline = torch.cuda.memory_allocated()
    for seed in range(20):
        engine.generate(small_request(seed=seed, width=96, height=64))
        assert torch.cuda.memory_allocated() == baseline
