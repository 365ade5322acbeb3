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
