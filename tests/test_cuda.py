"""GPU checks (skipped without CUDA): fp16 staged residency, figures, and a cache hit's zero cost."""

from __future__ import annotations

import pytest
import torch

from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.pipeline import Engine, open_model

from .conftest import small_request

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_render_reports_peaks_and_returns_memory(demo_model, tmp_path):
    engine = Engine(open_model(demo_model), "cuda", cache=EmbeddingCache(tmp_path))
    assert engine.dtype == torch.float16
    baseline = torch.cuda.memory_allocated()
    first = engine.generate(small_request(width=128, height=128))
    for s in first.stages:
        assert s.peak_allocated and s.peak_reserved and s.device_total and s.device_free is not None
        assert s.resident_end <= baseline + 64 * 2**20  # the model went back to the host
    again = engine.generate(small_request(width=128, height=128))
    assert first.image.tobytes() == again.image.tobytes()
    text = again.stages[0]
    assert text.cache == "hit" and text.skipped
    assert text.peak_allocated == text.resident_start  # not one byte allocated by the text stage
    assert torch.cuda.memory_allocated() <= baseline + 64 * 2**20


def test_same_seed_same_image_on_cpu_and_cuda_noise(demo_model):
    """The starting noise is drawn on the CPU: the latents start identical on both devices."""
    from sdterm.engine.pipeline import latents_noise

    a, _ = latents_noise(3, 64, 64)
    b, _ = latents_noise(3, 64, 64)
    assert torch.equal(a.cuda().cpu(), b)


def test_plans_give_the_same_pixels_on_cuda(demo_model):
    """Resident, staged (with prefetch) and streamed execution run the same kernels on the same
    weights: the images are identical."""
    from sdterm.engine.planner import GiB, Plan

    req = small_request(width=128, height=96, steps=4, negative="blurry")
    base = Engine(open_model(demo_model), "cuda", plan=Plan(GiB, text="resident", unet="resident", vae="resident"))
    ref = base.generate(req).image.tobytes()
    n_units = len(base.module("unet").units())
    for plan in (
        Plan(GiB, prefetch_unet=True, prefetch_vae=True),
        Plan(GiB, unet="streamed", resident_units=frozenset(range(0, n_units, 3)), ring_bytes=4 * 2**20),
    ):
        got = Engine(open_model(demo_model), "cuda", plan=plan).generate(req).image.tobytes()
        assert got == ref, plan


def test_budget_is_respected_on_cuda(demo_model):
    """With a budget, the planner's plan keeps every stage's peak under it."""
    engine = Engine(open_model(demo_model), "cuda", budget=512 * 2**20)
    r = engine.generate(small_request(width=256, height=256))
    assert all(s.peak_allocated <= 512 * 2**20 for s in r.stages)


def test_allocated_memory_returns_to_baseline_after_every_render(demo_model, tmp_path):
    """Staged models leave the device after each render; nothing accumulates over many renders."""
    from sdterm.engine.planner import GiB, Plan

    engine = Engine(open_model(demo_model), "cuda", plan=Plan(GiB), cache=EmbeddingCache(tmp_path))
    engine.generate(small_request())  # warm-up: cuBLAS/cuDNN workspaces
    baseline = torch.cuda.memory_allocated()
    for seed in range(20):
        engine.generate(small_request(seed=seed, width=96, height=64))
        assert torch.cuda.memory_allocated() == baseline
