"""Retries and fallbacks give the image a first try would have: out-of-memory in each stage
(eta > 0 included), a prefetch in flight, an fp16 overflow in the VAE; and the engine's own
portability rules. CPU, through the same code paths the GPU uses (tests/test_cuda.py repeats
the stage OOMs on CUDA)."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdterm.config import VAEConfig
from sdterm.engine.events import Notice
from sdterm.engine.memory.planner import GiB, Plan
from sdterm.engine.memory.tiling import decode_latents, fp32_decode_tile, tiled_decode_bytes
from sdterm.engine.pipeline import Engine, open_model, to_image
from sdterm.engine.sampling import ddim, guidance

from .conftest import oom_on_call, small_request

pytestmark = pytest.mark.usefixtures("one_thread")

REQ = dict(width=256, height=192, steps=4, negative="blurry", eta=0.5)
STAGED = Plan(GiB, prefetch_unet=True, prefetch_vae=True)


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


def collect(notices: list[str]):
    return lambda e: isinstance(e, Notice) and notices.append(e.message)


@pytest.fixture(scope="module")
def eta_baseline(demo_model):
    return Engine(open_model(demo_model), "cpu", plan=STAGED).generate(small_request(**REQ))


def test_eta_render_that_runs_out_of_memory_after_drawing_noise_gives_the_same_pixels(
    demo_model, eta_baseline, monkeypatch
):
    """The OOM strikes inside a step after that step's noise was drawn: the retry must restore
    the generator, or it would draw the next step's noise instead."""
    monkeypatch.setattr(ddim, "ddim_step", oom_on_call(ddim.ddim_step, 2))
    notices: list[str] = []
    r = Engine(open_model(demo_model), "cpu", plan=STAGED).generate(small_request(**REQ), emit=collect(notices))
    assert any("retrying" in n for n in notices), notices
    assert torch.equal(r.latents, eta_baseline.latents)
    assert np.array_equal(pixels(r), pixels(eta_baseline))


@pytest.mark.parametrize("stage", ["text", "unet", "vae"])
def test_out_of_memory_in_each_stage_with_eta_gives_the_same_image(demo_model, eta_baseline, stage):
    engine = Engine(open_model(demo_model), "cpu", plan=STAGED)
    model = engine.models.module(stage)
    model.forward = oom_on_call(model.forward, 3 if stage == "unet" else 1)
    notices: list[str] = []
    r = engine.generate(small_request(**REQ), emit=collect(notices))
    assert any("retrying" in n for n in notices), notices
    assert torch.equal(r.latents, eta_baseline.latents)
    if stage != "vae":  # a VAE retry decodes in tiles: the latents are the same, pixels close
        assert np.array_equal(pixels(r), pixels(eta_baseline))


def test_text_oom_with_the_unet_prefetch_in_flight_first_drops_the_prefetch(demo_model, eta_baseline):
    engine = Engine(open_model(demo_model), "cpu", plan=STAGED)
    text = engine.models.module("text")
    prefetched_at_failure = []
    text.forward = oom_on_call(text.forward, 1, before=lambda: prefetched_at_failure.append(
        engine.placement.on_device("unet")))
    notices: list[str] = []
    r = engine.generate(small_request(**REQ), emit=collect(notices))
    assert prefetched_at_failure == [True]  # the U-Net prefetch was in flight when the text stage failed
    retry = [n for n in notices if "retrying" in n]
    assert len(retry) == 1 and "text encoder" in retry[0].lower(), notices
    assert np.array_equal(pixels(r), pixels(eta_baseline))


def test_a_real_fp16_overflow_in_the_vae_is_decoded_again_in_fp32(demo_model):
    """fp16 on the CPU, with a decoder whose first conv overflows fp16 (x3000) but not fp32."""
    engine = Engine(open_model(demo_model), "cpu")
    engine.models.dtype = torch.float16  # before any model is built: everything runs in fp16
    vae = engine.models.module("vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3000.0)
        vae.decoder.conv_in.bias.mul_(3000.0)
    reference = copy.deepcopy(vae).float()
    notices: list[str] = []
    r = engine.generate(small_request(width=64, height=64), emit=collect(notices))
    with torch.inference_mode():
        assert not torch.isfinite(decode_latents(copy.deepcopy(reference).half(), r.latents.half())).all()
        expected = np.asarray(to_image(decode_latents(reference, r.latents.float()))).astype(int)
    assert sum("fp32" in n for n in notices) == 1, notices
    assert "fp32" in r.stages[2].note
    assert np.abs(pixels(r) - expected).max() <= 1
    assert pixels(r).std() > 10  # a real picture, not the black of NaN
    assert vae.post_quant_conv.weight.dtype == torch.float16  # the model is back in its run dtype


def test_fp32_redecode_tile_is_planned_for_fp32_activations():
    cfg = VAEConfig()
    lat = 128  # a 1024x1024 image
    fp16_whole = tiled_decode_bytes(cfg, lat, lat, torch.float16, None)
    fp32_whole = tiled_decode_bytes(cfg, lat, lat, torch.float32, None)
    assert fp32_whole > 1.9 * fp16_whole
    # Room for a whole fp16 decode, not a whole fp32 one: the fp32 decode is tiled, and fits.
    tile = fp32_decode_tile(cfg, lat, lat, None, fp16_whole)
    assert tile is not None and tiled_decode_bytes(cfg, lat, lat, torch.float32, tile) <= fp16_whole
    # Room enough: the plan's choice stands; a plan's tile is never made larger.
    assert fp32_decode_tile(cfg, lat, lat, None, fp32_whole) is None
    assert fp32_decode_tile(cfg, lat, lat, 32, fp32_whole) == 32
    planned16 = 64
    smaller = fp32_decode_tile(cfg, lat, lat, planned16, tiled_decode_bytes(cfg, lat, lat, torch.float16, planned16))
    assert smaller is not None and smaller < planned16


def test_embedding_cache_key_names_the_encoders_precision(demo_model, tmp_path):
    """A hit must give the pixels a miss would: an fp32 CPU entry is not an fp16 GPU entry."""
    from sdterm.engine.embedding_cache import EmbeddingCache, cache_key

    fox = (49406, 320, 3240, 49407)
    k32 = cache_key("enc", "tok", fox, precision="cpu-float32")
    assert k32 != cache_key("enc", "tok", fox, precision="cuda-float16")
    cache = EmbeddingCache(tmp_path)
    Engine(open_model(demo_model), "cpu", cache=cache).generate(small_request())
    half = Engine(open_model(demo_model), "cpu", cache=cache)
    half.models.dtype = torch.float16
    r = half.generate(small_request())
    assert r.stages[0].cache == "miss"  # the fp32 entries are not served to an fp16 encoder
    again = half.generate(small_request())
    assert again.stages[0].cache == "hit" and again.image.tobytes() == r.image.tobytes()


def test_the_engine_imports_without_the_resource_module():
    """Windows has no ``resource``: the engine must import and report host memory anyway."""
    code = (
        "import sys; sys.modules['resource'] = None\n"
        "import sdterm.engine.pipeline, sdterm.engine.memory.meter as p\n"
        "print(type(p.host_rss()).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "int"


def test_guided_passes_match_what_the_denoiser_calls():
    """The streamed U-Net prefetches exactly ``unet_passes`` passes per step: count them."""
    for scale, split in ((7.5, False), (7.5, True), (1.0, True), (1.0, False)):
        calls = []

        def unet(x, t, ctx):
            calls.append(x.shape[0])
            return torch.zeros_like(x)

        ctx = torch.zeros(1, 3, 2)
        guidance.guided(unet, ctx, ctx, scale, split=split)(torch.zeros(1, 4, 2, 2), 10)
        assert len(calls) == guidance.unet_passes(scale, split=split), (scale, split)
