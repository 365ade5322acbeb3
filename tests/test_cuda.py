"""GPU checks (skipped without CUDA): streams, budgets, retries and figures on a real device.

The CPU suite runs the same code paths, but on the CPU every copy is synchronous: only here can a
test see a copy still in flight, memory reused under it, or the allocator's counters.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
from torch import nn

from sdterm.config import ModelConfig
from sdterm.engine import unet_stage
from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.events import Notice
from sdterm.engine.memory.placement import Placement
from sdterm.engine.memory.planner import GiB, MiB, Plan
from sdterm.engine.memory.streaming import RingStreamer
from sdterm.engine.memory.tiling import decode_latents
from sdterm.engine.pipeline import Engine, ModelSource, open_model, to_image
from sdterm.engine.sampling import ddim
from sdterm.samplers import SAMPLER_LIST, SAMPLERS

from .conftest import oom_on_call, small_request
from .test_engine import SEED3_64x64_NOISE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PATTERN = 0xA5


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(int)


def settled_allocated() -> int:
    """Device bytes allocated once garbage is collected: an earlier test's engine, freed by the
    cycle collector at whatever moment it runs, must not move a before/after comparison."""
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


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
    engine.cuda_graphs = False  # one streamer for the render (graphed, a streamer per pass: below)
    req = small_request(width=512, height=512, steps=4)
    engine.generate(req)  # warm-up: cuBLAS workspace, cached embeddings
    torch.cuda.synchronize()
    baseline = settled_allocated()
    seen = spy_streamers(monkeypatch)
    r = engine.generate(req)
    assert "streamed" in r.plan and len(seen) == 1
    s = seen[0]
    # Only the compute stream is waited on: the join at the stage's end covers every copy.
    torch.cuda.current_stream().synchronize()
    assert s.last_copy is not None and s.last_copy.query()
    assert engine.placement.copy_stream.query()
    assert s.next == s.total == req.steps * len(s.order)  # no prefetch past the last pass
    torch.cuda.synchronize()
    assert settled_allocated() == baseline


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
    engine.cuda_graphs = False  # an OOM of an eager call (a replay allocates nothing: see the graph tests)
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
    # The process's own device memory first (cuBLAS's workspaces, kept per stream for good), as any
    # earlier test leaves it: run alone, this test would count them as the render's.
    Engine(open_model(demo_model), "cuda").generate(small_request(width=128, height=128))
    engine = Engine(open_model(demo_model), "cuda", cache=EmbeddingCache(tmp_path))
    assert engine.dtype == torch.float16
    baseline = settled_allocated()
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


@pytest.mark.parametrize("text", ["resident", "staged"])
def test_a_one_shot_engine_lets_the_text_encoder_go_from_the_device_and_the_host(demo_model, tmp_path, text):
    """``keep_text`` off (``sdterm generate``): after the text stage nothing holds the encoder (its
    device copy, the placement's units) nor its page-locked host buffer; a new prompt builds it
    again, with the pixels of an engine that kept it."""
    from sdterm.engine.memory import host_memory

    from .test_text_let_go import watched_text_builds

    def locked() -> int:
        return sum(host_memory._LOCKED.values())

    plan = Plan(GiB, text=text, unet="resident", vae="resident", prefetch_unet=True)
    base = locked()
    engine = Engine(open_model(demo_model), "cuda", cache=EmbeddingCache(tmp_path / "let-go"), plan=plan)
    engine.keep_text = False
    built = watched_text_builds(engine)
    first = engine.generate(small_request())
    gc.collect()
    assert len(built) == 1 and built[0]() is None and "text" not in engine.placement.models
    let_go = locked() - base
    kept = Engine(open_model(demo_model), "cuda", cache=EmbeddingCache(tmp_path / "kept"), plan=plan)
    assert torch.equal(first.latents, kept.generate(small_request()).latents)
    held = locked() - base - let_go
    assert held - let_go >= engine.models.sizes().text * 0.9  # the kept engine's text buffer, locked
    other = engine.generate(small_request(prompt="a blue heron"))
    assert len(built) == 2 and not other.stages[0].skipped
    assert torch.equal(other.latents, kept.generate(small_request(prompt="a blue heron")).latents)


def test_allocated_memory_returns_to_baseline_after_every_render(demo_model, tmp_path):
    """Staged models leave the device after each render; nothing accumulates over many renders."""
    engine = Engine(open_model(demo_model), "cuda", plan=Plan(GiB, prefetch_unet=True, prefetch_vae=True),
                    cache=EmbeddingCache(tmp_path))
    engine.generate(small_request())  # warm-up: cuBLAS/cuDNN workspaces
    baseline = settled_allocated()
    for seed in range(20):
        engine.generate(small_request(seed=seed, width=96, height=64))
        assert settled_allocated() == baseline


# --- The "nv" generator against torch's CUDA generator (issue 13) ----------------------------

NV_SEEDS = [0, 1, 42, 12345, 2**32 - 1, 2**32 + 31336]  # the last: a seed + ENSD past 32 bits
NV_SHAPES = [(1, 4, 64, 64), (1, 4, 96, 64), (2, 4, 8, 8), (1, 4, 13, 7), (3, 4), (1,), (1, 4, 128, 128)]


def _cuda_generator(seed: int) -> torch.Generator:
    return torch.Generator("cuda").manual_seed(seed)


@pytest.mark.parametrize("shape", NV_SHAPES)
def test_nv_philox_words_are_the_cuda_generators_bit_for_bit(shape):
    """What the CPU emulation and torch's CUDA kernel share exactly: the Philox blocks (key = seed,
    subsequence = element, one counter step per call). torch.randint shows them: an int64 range of
    2^62 takes the kernel's 64-bit path, (w0 << 32 | w1) modulo the range, so word 1 whole and the
    low 30 bits of word 0. A randn draw between two randint draws checks that it moves the CUDA
    generator's offset on by one block, as PhiloxGenerator moves its counter."""
    from sdterm.engine.sampling.rng import PhiloxGenerator

    n = int(np.prod(shape))
    for seed in NV_SEEDS:
        g, ours = _cuda_generator(seed), PhiloxGenerator(seed)
        for call in range(3):
            if call == 1:
                torch.randn(shape, device="cuda", generator=g)
                ours.randn(shape)
                continue
            got = torch.randint(0, 2**62, shape, device="cuda", generator=g, dtype=torch.int64).cpu().numpy().ravel()
            w = ours.words(n).astype(np.uint64)
            ours.offset += 1
            expected = ((w[0] & np.uint64(2**30 - 1)) << np.uint64(32)) | w[1]
            assert np.array_equal(got.astype(np.uint64), expected), (seed, call)


@pytest.mark.parametrize("shape", NV_SHAPES)
def test_nv_randn_is_torch_randn_on_cuda(shape):
    """PhiloxGenerator(s).randn(shape) against torch.randn(shape, device="cuda",
    generator=torch.Generator("cuda").manual_seed(s)), first and second draw.

    Not bit for bit, and A1111's NV generator isn't either: the Philox words are the same (above),
    but the Box-Muller step here is A1111's (float64, rounded once), where curand computes u in
    float32 (near u = 1, that is, near-zero outputs, it keeps fewer bits of the word) and uses
    logf and the hardware's approximate __sincosf. Seen on an H100 (torch 2.11, CUDA 13): about 16%
    of the numbers equal, the median gap 1.2e-7 (one unit in the last place at 1), 99.9% within
    1.6e-6, the largest 2.3e-5 (at an output of -0.0006), relative gaps under 2.2e-5 for |x| > 0.1."""
    from sdterm.engine.sampling.rng import PhiloxGenerator

    for seed in NV_SEEDS:
        g, ours = _cuda_generator(seed), PhiloxGenerator(seed)
        for draw in range(2):
            ref = torch.randn(shape, device="cuda", generator=g).cpu()
            got = ours.randn(shape)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            gap = (got.double() - ref.double()).abs()
            assert float(gap.max()) <= 5e-5, (seed, draw)
            if gap.numel() >= 100:  # most numbers a unit in the last place apart at most
                assert float(gap.median()) <= 2.5e-7, (seed, draw)
            if gap.numel() >= 1000:
                assert float(gap.flatten().quantile(0.999)) <= 3e-6, (seed, draw)
            big = ref.abs() > 0.1
            if big.any():
                assert float((gap[big] / ref[big].double().abs()).max()) <= 5e-5, (seed, draw)


def test_gpu_mode_is_torch_randn_on_cuda_and_nv_follows_it():
    from sdterm.engine.sampling.rng import ImageRNG

    for seed, (w, h) in [(0, (512, 512)), (42, (512, 768)), (2**32 - 1, (72, 104))]:
        gpu = ImageRNG(seed, w, h, rng="gpu")
        nv = ImageRNG(seed, w, h, rng="nv", device="cuda")
        g = _cuda_generator(seed)
        shape = (1, 4, h // 8, w // 8)
        for draw in range(3):
            x = gpu.next()
            assert x.device.type == "cuda"
            assert torch.equal(x, torch.randn(shape, device="cuda", generator=g))
            assert torch.allclose(nv.next(), x, rtol=0, atol=5e-5)
    # ENSD: the per-step generator is a fresh one seeded with seed + ENSD, on both.
    gpu, nv = ImageRNG(7, 64, 64, rng="gpu", ensd=31337), ImageRNG(7, 64, 64, rng="nv", ensd=31337, device="cuda")
    assert torch.allclose(gpu.first(), nv.first(), rtol=0, atol=5e-5)
    step = torch.randn((1, 4, 8, 8), device="cuda", generator=_cuda_generator(7 + 31337))
    assert torch.equal(gpu.next(), step) and torch.allclose(nv.next(), step, rtol=0, atol=5e-5)
    # A retry on the GPU generator draws the same again.
    state = gpu.get_state()
    a = gpu.next()
    gpu.set_state(state)
    assert torch.equal(gpu.next(), a)


@pytest.mark.filterwarnings("ignore:Should have tb<=t1:UserWarning")
def test_brownian_gpu_is_kdiffusions_sampler_on_cuda_and_cpu_nv_move_with_the_latent():
    """A1111's "GPU" Brownian noise is torchsde's own draws on CUDA; "cpu" and "nv" draw where
    their generator lives and give the same noise for a latent on the CPU or on CUDA."""
    pytest.importorskip("torchsde")
    from sdterm.engine.sampling.rng import ImageRNG

    from .test_rng import kdiffusion_sampling

    kd = kdiffusion_sampling()
    sigmas = torch.tensor([14.6146, 6.0, 2.5, 0.9, 0.3, 0.0292, 0.0])
    smin, smax = sigmas[sigmas > 0].min(), sigmas.max()
    x = torch.zeros(1, 4, 8, 8, device="cuda")
    ref = kd.BrownianTreeNoiseSampler(x, smin.cuda(), smax.cuda(), seed=[1234])
    ours = ImageRNG(1234, 64, 64, rng="gpu").brownian(x, smin.cuda(), smax.cuda())
    for s, s_next in zip(sigmas[:-2].cuda(), sigmas[1:-1].cuda()):
        assert torch.equal(ours(s, s_next), ref(s, s_next))
    for rng in ("cpu", "nv"):
        on_cpu = ImageRNG(1234, 64, 64, rng=rng).brownian(x.cpu(), smin, smax)
        on_gpu = ImageRNG(1234, 64, 64, rng=rng).brownian(x, smin.cuda(), smax.cuda())
        for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
            assert torch.allclose(on_gpu(s.cuda(), s_next.cuda()).cpu(), on_cpu(s, s_next), rtol=0, atol=1e-5)


# ---- every sampler on every plan -----------------------------------------------------------------


def spy_streamers(monkeypatch) -> list[RingStreamer]:
    """The U-Net streamers the engine makes from now on, in order (each is the real one)."""
    seen: list[RingStreamer] = []
    real = unet_stage.RingStreamer

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(unet_stage, "RingStreamer", spy)
    return seen


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("sampler", [s.name for s in SAMPLER_LIST])
def test_every_sampler_streams_exactly_its_planned_passes(full_size, sampler, monkeypatch):
    """Full-size weights, the U-Net streamed (1 GiB) with split CFG: the streamer was told exactly
    the passes the sampler makes (it raises on a pass nobody planned and must not prefetch past the
    last), and the latents are the resident plan's (the same arithmetic, placed differently).
    Graphed (a streamer per pass, captured): the eager streamed latents bit for bit."""
    engine = Engine(full_size, "cuda")
    req = small_request(width=256, height=256, steps=3, sampler=sampler, seed=5)
    engine.set_budget(None)
    resident = engine.generate(req)
    assert "resident" in resident.plan
    seen = spy_streamers(monkeypatch)
    engine.set_budget(GiB)
    engine.cuda_graphs = False
    streamed = engine.generate(req)
    assert "streamed" in streamed.plan and len(seen) == 1
    s = seen[0]
    # Every planned pass was made (none left over) and none unplanned (the streamer raises then).
    passes_per_call = s.total // (SAMPLERS[sampler].calls(3) * len(s.order))
    assert s.next == s.total == SAMPLERS[sampler].calls(3) * passes_per_call * len(s.order)
    assert passes_per_call in (1, 2)
    assert torch.allclose(streamed.latents, resident.latents, rtol=1e-3, atol=1e-3), sampler
    engine.cuda_graphs = True
    for _ in range(2):  # the first render warms up and captures, the second captures at once
        graphed = engine.generate(req)
        assert torch.equal(graphed.latents, streamed.latents), sampler
    assert engine.unet_graphs.captures >= 2 and not engine.unet_graphs.failures, engine.unet_graphs.failures


@pytest.mark.parametrize("sampler", ["DDIM", "Heun"])
def test_a_scheduled_prompt_with_an_embedding_gives_the_resident_pixels_on_every_plan(full_size, tmp_path, sampler):
    """Prompt editing (the conditioning changes mid-render), an embedding (its vectors in fp16
    through the encoder on the GPU) and a negative of another chunk count (cond and uncond run
    apart): resident, staged and streamed give the same picture, and the streamer's pass count
    (it raises on an unplanned pass) holds when the conditioning switches."""
    vectors = torch.randn(2, ModelConfig().text.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.02
    torch.save({"string_to_param": {"*": vectors}}, tmp_path / "foxy.pt")
    engine = Engine(full_size, "cuda", embedding_dirs=[tmp_path])
    req = small_request(width=256, height=256, steps=4, sampler=sampler, prompt="a [red:blue:0.5] (foxy:1.2)",
                        negative="blurry BREAK dark")
    reference = None
    for name, budget in {"resident": None, "staged": 2 * GiB, "streamed": GiB}.items():
        engine.set_budget(budget)
        r = engine.generate(req)
        assert name in r.plan, (name, r.plan)
        assert [e["name"] for e in r.prompts["prompt"]["embeddings"]] == ["foxy"]
        if reference is None:
            reference = r.latents
        else:
            assert torch.allclose(r.latents, reference, rtol=1e-3, atol=1e-3), name


def test_a_lora_gives_the_same_pixels_on_every_plan_and_comes_out_cleanly(full_size, tmp_path):
    """A rank-16 LoRA on the full-size U-Net's transformer blocks and the text encoder, merged on
    the GPU: resident, staged and streamed give the resident latents; a weight change re-merges;
    the render without it afterwards is the plain render again, bit for bit."""
    from sdterm.bench.lora import NAME, write_random_lora

    write_random_lora(ModelConfig(), tmp_path, 16)
    engine = Engine(full_size, "cuda", lora_dirs=[tmp_path])
    plain = small_request(width=256, height=256, steps=4, negative="blurry")
    tagged = plain.replace(prompt=f"{plain.prompt} <lora:{NAME}:1>")
    engine.set_budget(None)
    before = engine.generate(plain)
    reference = None
    for name, budget in {"resident": None, "staged": 2 * GiB, "streamed": GiB}.items():
        engine.set_budget(budget)
        r = engine.generate(tagged)
        assert name in r.plan and r.loras and r.loras[0]["name"] == NAME, (name, r.plan)
        if reference is None:
            reference = r.latents
            assert not torch.allclose(r.latents, before.latents, atol=1e-3)  # the LoRA does something
        else:
            assert torch.allclose(r.latents, reference, rtol=1e-3, atol=1e-3), name
    engine.set_budget(None)
    half = engine.generate(plain.replace(prompt=f"{plain.prompt} <lora:{NAME}:0.5>"))
    assert not torch.allclose(half.latents, reference, atol=1e-3)
    after = engine.generate(plain)
    assert torch.equal(after.latents, before.latents)


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "DPM++ 2M", "Heun", "DPM++ SDE", "LCM"])
def test_img2img_gives_the_resident_latents_on_every_plan_and_streams_its_passes(full_size, tmp_path, sampler,
                                                                                  monkeypatch):
    """The init image encoded on the GPU (the encoder placed as the decoder is), then an img2img
    render: resident, staged and streamed give the same latents, and the streamer (which raises on
    an unplanned pass) was told exactly the passes an img2img render makes."""
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (256, 256), (180, 90, 40)).save(init)
    engine = Engine(full_size, "cuda")
    req = small_request(width=256, height=256, steps=6, sampler=sampler, init_image=str(init), strength=0.6,
                        negative="blurry")
    seen = spy_streamers(monkeypatch)
    reference = None
    for name, budget in {"resident": None, "staged": 2 * GiB, "streamed": GiB}.items():
        engine.set_budget(budget)
        r = engine.generate(req)
        assert name in r.plan, (name, r.plan)
        if reference is None:
            reference = r.latents
        else:
            assert torch.allclose(r.latents, reference, rtol=1e-3, atol=1e-3), name
    # Graphed, a streamer per pass (each told one pass): none made a pass it was not told of.
    assert seen and all(s.next == s.total for s in seen)


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_gives_the_resident_latents_on_every_plan(full_size, upscaler, monkeypatch):
    """A hires fix (256 -> 512, latent or pixel upscale): each pass planned at its own size, the
    second streamed through its own ring when the budget is small; the same latents on every plan,
    the streamers told exactly the passes each pass makes, every stage within the budget."""
    engine = Engine(full_size, "cuda")
    req = small_request(width=256, height=256, steps=4, sampler="DPM++ 2M", negative="blurry", hires_scale=2.0,
                        hires_steps=3, hires_upscaler=upscaler)
    seen = spy_streamers(monkeypatch)
    reference = None
    for name, budget in {"resident": None, "staged": 2 * GiB, "streamed": GiB}.items():
        engine.set_budget(budget)
        r = engine.generate(req)
        assert r.image.size == (512, 512)
        assert [s.stage for s in r.stages][-2:] == ["hires", "vae"], [s.stage for s in r.stages]
        for s in r.stages:
            assert budget is None or s.peak_allocated <= budget, (name, s.stage, s.peak_allocated / MiB, r.plan)
        if reference is None:
            reference = r.latents
        else:
            assert torch.allclose(r.latents, reference, rtol=1e-3, atol=1e-3), name
    assert seen and all(s.next == s.total for s in seen)


def test_hires_fix_of_512x768_to_1024x1536_stays_in_a_3_5_gib_budget(full_size):
    """The issue's case on full-size weights (fewer steps: the memory is the same each step)."""
    budget = int(3.5 * GiB)
    engine = Engine(full_size, "cuda", budget=budget)
    r = engine.generate(small_request(width=512, height=768, steps=2, hires_scale=2.0, hires_steps=2,
                                      negative="blurry"))
    assert r.image.size == (1024, 1536)
    for s in r.stages:
        assert s.peak_allocated <= budget, (s.stage, s.peak_allocated / MiB, r.plan)


def test_out_of_memory_in_the_hires_pass_resumes_it(demo_model):
    """An out-of-memory in the middle of the hires pass: a cheaper plan, the pass resumed where it
    was (the first pass not run again), the same latents as without the failure."""
    plan = Plan(GiB, unet="resident", text="resident", vae="resident", prefetch_vae=True)
    req = small_request(width=128, height=128, steps=4, eta=0.5, negative="blurry", hires_scale=2.0, hires_steps=4,
                        sampler="Euler a")
    base = Engine(open_model(demo_model), "cuda", plan=plan).generate(req)
    engine = Engine(open_model(demo_model), "cuda", plan=plan)
    engine.cuda_graphs = False  # counts the U-Net's eager calls (a replay makes none)
    unet = engine.models.module("unet")
    calls = []
    forward = oom_on_call(unet.forward, 4 + 2)  # the hires pass's second call
    unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    notices: list[str] = []
    r = engine.generate(req, emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any("hires U-Net" in n and "retrying" in n for n in notices), notices
    assert len(calls) == 4 + 4 + 1  # the failed call made again, nothing else
    assert torch.equal(r.latents, base.latents)


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
def test_previews_and_forks_on_every_plan(full_size):
    """Previews made on the GPU (pinned copies behind events, finished on their thread) arrive one a
    step, the last within a level of the final latent's map (Euler lands on its prediction); a
    render's trail kept on the way resumes a fork that reproduces it, on every plan."""
    from sdterm.engine.events import Preview
    from sdterm.engine.fork import Fork
    from sdterm.engine.preview import latent_rgb

    engine = Engine(full_size, "cuda")
    req = small_request(width=256, height=256, steps=5, sampler="Euler", negative="blurry")
    for name, budget in {"resident": None, "staged": 2 * GiB, "streamed": GiB}.items():
        engine.set_budget(budget)
        frames = []
        parent = engine.generate(req, emit=lambda e: isinstance(e, Preview) and frames.append(e), preview=0.0,
                                 trail=True)
        # One a step at most: a frame whose buffers are all still on their way is skipped (a
        # graphed U-Net can run ahead of the copies), the last always comes.
        steps = [f.step for f in frames]
        assert name in parent.plan and steps == sorted(set(steps)) and steps[-1] == 5 and len(steps) >= 2, (name, steps)
        last = torch.from_numpy(np.asarray(frames[-1].image)).int()
        assert (last - latent_rgb(parent.latents).int()).abs().max() <= 1, name
        assert all(s.carry["x"].device.type == "cpu" for s in parent.trail)
        child = engine.generate(req, fork=Fork(req, parent.trail[2]))
        assert torch.equal(child.latents, parent.latents), name


@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
def test_taesd_previews_where_the_plan_has_room_and_never_above_the_budget(full_size, tmp_path):
    """With a TAESD file: an image-sized frame every 8th frame and the last when the budget has room
    (no budget), the linear map only under a 1 GiB budget (streamed: no room), whose peak stays
    within it."""
    from safetensors.torch import save_file

    from sdterm.engine.events import Preview
    from sdterm.engine.networks.taesd import TAESDDecoder

    path = tmp_path / "taesd.safetensors"
    save_file({k: v.contiguous() for k, v in TAESDDecoder().state_dict().items()}, str(path))
    engine = Engine(full_size, "cuda", taesd=path)
    req = small_request(width=256, height=256, steps=5, sampler="Euler")
    for budget, expected in ((None, [8, 8, 8, 8, 1]), (GiB, [8, 8, 8, 8, 8])):  # TAESD: every 8th frame, the last
        engine.set_budget(budget)
        frames = []
        r = engine.generate(req, emit=lambda e: isinstance(e, Preview) and frames.append(e), preview=0.0)
        # A frame whose buffers are all still in flight is skipped (a graphed U-Net runs ahead of
        # the copies): the frames that came are the expected ones, the last always among them.
        scales = [f.scale for f in frames]
        assert len(scales) >= 2 and scales[-1] == expected[-1] and scales[:-1] == expected[:len(scales) - 1], (
            budget, r.plan, scales)
        assert all(f.image.size == ((256, 256) if f.scale == 1 else (32, 32)) for f in frames)
        for s in r.stages:
            assert budget is None or s.peak_allocated <= budget, (s.stage, s.peak_allocated / MiB)


# ---- CUDA graphs (issue 18) ----------------------------------------------------------------------


GRAPH_CASES = [
    # (plan budget, request): resident / staged, batch of two / split passes, sizes, a prompt schedule
    (None, dict(width=512, height=512, steps=6, negative="blurry")),
    (2 * GiB, dict(width=512, height=512, steps=6, negative="blurry", sampler="DPM++ 2M", schedule="Karras")),
    (None, dict(width=520, height=384, steps=5, prompt="a [red:blue:0.5] fox", sampler="Heun")),
    (None, dict(width=512, height=512, steps=4, prompt="a fox " * 60, negative="blurry")),  # apart: 2 vs 1 chunks
    (GiB, dict(width=512, height=512, steps=6, negative="blurry")),  # streamed: the copies captured too
    (GiB, dict(width=520, height=384, steps=4, prompt="a [red:blue:0.5] fox " * 40, sampler="Euler a")),
]


@pytest.mark.parametrize("budget,request_kw", GRAPH_CASES)
def test_graphed_renders_are_the_eager_renders_bit_for_bit(full_size, budget, request_kw):
    """Two renders with graphs (the first captures, the second replays from its first call) and
    one eager: identical latents. Graphs must actually have been captured and replayed."""
    engine = Engine(full_size, "cuda", budget=budget)
    req = small_request(**request_kw)
    engine.cuda_graphs = False
    eager = engine.generate(req)
    engine.cuda_graphs = True
    first = engine.generate(req)
    graphs = engine.unet_graphs
    assert graphs.captures >= 1 and not graphs.failures, graphs.failures
    second = engine.generate(req)
    assert torch.equal(first.latents, eager.latents) and torch.equal(second.latents, eager.latents), first.plan
    if budget is None:  # resident with room: the graphs stayed, the second render captured nothing new
        assert "unet resident" in second.plan and graphs.graphs
        assert graphs.captures == len([g for g in graphs.graphs.values() if g is not None])


@pytest.mark.parametrize("budget,plan", [(2 * GiB, "unet staged"), (GiB, "unet streamed")])
def test_graphs_stay_in_the_budget_and_leave_no_memory_behind(full_size, budget, plan):
    """Staged (2 GiB) and streamed (1 GiB, graphed pass by pass): the U-Net stage's peak (its
    weights or resident units and ring, and the graphs' pool) stays within the budget, the graphs
    (and the ring) go at the end of the stage (allocated memory back to its baseline), the next
    render captures again, and no copy is left pending."""
    engine = Engine(full_size, "cuda", budget=budget)
    req = small_request(width=512, height=512, steps=4, negative="blurry")
    engine.generate(req)
    baseline = settled_allocated()
    r = engine.generate(req)
    graphs = engine.unet_graphs
    assert plan in r.plan and graphs.captures >= 2 and not graphs.graphs, (r.plan, graphs.skipped, graphs.failures)
    assert not graphs.skipped and not graphs.failures
    for s in r.stages:
        assert s.peak_allocated <= budget, (s.stage, s.peak_allocated / MiB, r.plan)
    torch.cuda.current_stream().synchronize()
    assert engine.placement.copy_stream.query()
    assert settled_allocated() == baseline
    # Bound pass by pass inside the render's inference mode, the weights are ordinary tensors
    # after it (bench's diffusers reference takes them as parameters).
    assert not any(t.is_inference() for t in engine.models.module("unet").state_dict().values())


def test_a_model_collected_during_a_capture_does_not_break_it(full_size):
    """Page-locked host memory that becomes garbage (in a reference cycle, as a dropped model's)
    in the middle of a capture, with the collector set to run at nearly every allocation: no
    collection may run inside the capture (its cudaHostUnregister would invalidate it, and the
    memory would stay registered after numpy frees it). The capture succeeds; the buffer is
    unlocked once collected after it."""
    from sdterm.engine.memory import host_memory

    engine = Engine(full_size, "cuda", budget=GiB)
    req = small_request(width=256, height=256, steps=3)
    engine.generate(req)  # the signature's eager call: the next render captures at its first call
    captures = engine.unet_graphs.captures
    pending = [host_memory.pinned_exact(64 * MiB)]
    assert pending[0] is not None
    address = pending[0].data_ptr()

    class Dropped:
        pass

    def drop(_module, _args):
        if pending and torch.cuda.is_current_stream_capturing():
            cycle = Dropped()
            cycle.me, cycle.host = cycle, pending.pop()

    hook = engine.models.module("unet").register_forward_pre_hook(drop)
    threshold = gc.get_threshold()
    gc.set_threshold(1)
    try:
        engine.generate(req)
    finally:
        gc.set_threshold(*threshold)
        hook.remove()
    graphs = engine.unet_graphs
    assert not pending and graphs.captures > captures and not graphs.failures, graphs.failures
    gc.collect()
    assert address not in host_memory._LOCKED  # collected after the capture, and unlocked


def test_a_pool_without_room_or_a_failed_capture_runs_eagerly(full_size, monkeypatch):
    """A staged plan whose budget has no room for a graph's pool (a pool estimated 20x the eager
    peak here), and a capture that runs out of memory: the U-Net runs eagerly, the same latents."""
    from sdterm.engine.memory import graphs as graphs_module

    engine = Engine(full_size, "cuda", budget=2 * GiB)
    req = small_request(width=512, height=512, steps=4)
    engine.cuda_graphs = False
    eager = engine.generate(req)
    engine.cuda_graphs = True
    monkeypatch.setattr(graphs_module, "POOL_FACTOR", 20.0)
    r = engine.generate(req)
    graphs = engine.unet_graphs
    assert "unet staged" in r.plan and graphs.captures == 0 and graphs.skipped, (r.plan, graphs.skipped)
    assert torch.equal(r.latents, eager.latents)
    monkeypatch.setattr(graphs_module, "POOL_FACTOR", 1.5)

    def no_memory(*_args, **_kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected into the capture)")

    monkeypatch.setattr(graphs_module._Graph, "__init__", no_memory)
    r = engine.generate(req)
    assert graphs.captures == 0 and graphs.failures and "OutOfMemoryError" in graphs.failures[0]
    assert torch.equal(r.latents, eager.latents)


def test_a_warmed_up_engine_renders_its_first_render_without_an_eager_call_or_a_capture(full_size, tmp_path):
    """After ``warm_up`` at the size the user renders, the first real render (resident plan)
    replays the graph the warm-up captured: no new capture, no eager warm-up call; same latents.
    The warm-up reads the text encoder even when the embedding cache has its empty prompt."""
    from sdterm.engine.embedding_cache import EmbeddingCache
    from sdterm.engine.warmup import warm_up

    req = small_request(width=512, height=512, steps=4, negative="blurry")
    cold = Engine(full_size, "cuda").generate(req)
    cache = EmbeddingCache(tmp_path / "embeddings")
    assert warm_up(Engine(full_size, "cuda", cache=cache), 512, 512, req.cfg)  # the empty prompt now cached
    engine = Engine(full_size, "cuda", cache=cache)
    built = []
    make = engine.models.factories["text"]
    engine.models.factories["text"] = lambda: built.append("text") or make()
    assert warm_up(engine, 512, 512, req.cfg)
    assert built == ["text"]
    graphs = engine.unet_graphs
    captured, calls = graphs.captures, []
    unet = engine.models.module("unet")
    forward = unet.forward
    unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    r = engine.generate(req)
    assert graphs.captures == captured and calls == [], (graphs.captures, captured, len(calls))
    assert torch.equal(r.latents, cold.latents)
    assert not r.stages[0].skipped and built == ["text"]  # a new prompt: encoded by the encoder read then


def test_layout_keeping_group_norm_on_the_gpu(monkeypatch):
    """On CUDA the U-Net's and the VAE's GroupNorm is engine/networks/norm.py's: it keeps a
    channels-last input channels-last, matches PyTorch's kernel in fp32, and in fp16 the models'
    outputs stay as close to a float64 reference as with PyTorch's kernel."""
    from sdterm.engine.loading.demo import demo_config
    from sdterm.engine.networks import norm
    from sdterm.engine.networks.norm import GroupNorm, group_norm

    spread = []
    own = norm.spread_group_norm
    monkeypatch.setattr(norm, "spread_group_norm", lambda x, *a: spread.append(x.shape) or own(x, *a))
    from sdterm.engine.networks.unet import UNetModel
    from sdterm.engine.networks.vae import VAEDecoder

    torch.manual_seed(0)
    x = (torch.randn(1, 128, 256, 256, device="cuda") * torch.rand(128, 1, 1, device="cuda") * 3
         + torch.randn(128, 1, 1, device="cuda")).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    y = group_norm(x, 32, w, b, 1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x.contiguous(), 32, w, b, 1e-6),
                               rtol=1e-4, atol=1e-4)

    def as_native(model, native: bool):
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.__class__ = nn.GroupNorm if native else GroupNorm

    cfg = demo_config(64)
    unet = UNetModel(cfg.unet).cuda().eval().requires_grad_(False)
    vae = VAEDecoder(cfg.vae).cuda().eval().requires_grad_(False)
    lat = torch.randn(2, 4, 128, 128, device="cuda")  # groups of 16K values and more at the top level
    t = torch.tensor([500.0, 500.0], device="cuda")
    ctx = torch.randn(2, 77, cfg.unet.context_dim, device="cuda")
    with torch.inference_mode():
        want = (unet.double()(lat.double(), t, ctx.double()), vae.double()(lat[:1].double()))
        unet.half().to(memory_format=torch.channels_last)
        vae.half().to(memory_format=torch.channels_last)
        errors = {}
        for native in (True, False):
            as_native(unet, native)
            as_native(vae, native)
            got = (unet(lat, t, ctx.half()), vae(lat[:1].half()))
            errors[native] = [(g.double() - r).abs().max().item() for g, r in zip(got, want)]
    assert len(spread) > 3  # the large groups took the new arithmetic (the small ones PyTorch's kernel)
    for ours, theirs in zip(errors[False], errors[True]):
        assert ours <= 2 * theirs + 1e-3, errors


def test_first_render_builds_the_unet_on_a_thread_while_warming_up(demo_model, full_size, tmp_path, monkeypatch):
    """A render whose U-Net is still to be built builds it on a thread while the render thread
    makes first calls: converted from the checkpoint, the U-Net's whole call (through the graphs,
    at the render's signatures) and the VAE decoder's, on stand-ins; read from the model cache,
    or streamed, the attention's alone. A render with the U-Net built makes none."""
    import threading

    from sdterm.engine.memory.graphs import signature

    from .test_model_cache import published

    warmed, builders = [], []
    monkeypatch.setattr(unet_stage, "warm_attention", lambda *a: warmed.append(("attention", a[1])))
    monkeypatch.setattr(unet_stage, "warm_unet", lambda unet, graphs, inputs: warmed.append(
        ("unet", [signature(*i) for i in inputs], graphs is not None, unet.out[2].weight.dtype,
         unet.out[2].weight.device.type)))
    monkeypatch.setattr(unet_stage, "warm_vae", lambda vae, latent, tile: warmed.append(
        ("vae", tuple(latent.shape), tile)))
    packs = tmp_path / "packs"
    engine = Engine(open_model(demo_model), "cuda", model_cache=packs)
    build = engine.models.module
    monkeypatch.setattr(engine.models, "module",
                        lambda stage: (builders.append((stage, threading.current_thread().name)), build(stage))[1])
    engine.generate(small_request(steps=2))
    assert ("unet", "sdterm-build") in builders
    x, t, text = ((2, 4, 8, 8), torch.float32), ((2,), torch.float32), ((2, 77, 32), torch.float16)
    assert warmed == [("unet", [(*x, *t, *text)], True, torch.float16, "cuda"), ("vae", (1, 4, 8, 8), None)], warmed
    engine.generate(small_request(steps=2))
    assert len(warmed) == 2
    published()
    warmed.clear()
    again = Engine(open_model(demo_model), "cuda", model_cache=packs)
    assert again.models.from_cache("unet")
    again.generate(small_request(steps=2, cfg=1.0))
    assert warmed == [("attention", [(1, 77)])], warmed
    warmed.clear()
    r = Engine(full_size, "cuda", budget=GiB).generate(small_request(width=512, height=512, steps=2))
    assert "streamed" in r.plan and warmed == [("attention", [(2, 77)])], (r.plan, warmed)
    monkeypatch.undo()
    # The real calls, at full SD v1 size (the engine ignores a failure here: this must not fail)
    unet_stage.warm_attention(ModelConfig().unet, [(2, 77), (1, 154)], 64, 64, torch.float16, torch.device("cuda"))


@pytest.mark.parametrize("plan", [None, Plan(2 * GiB)])  # resident; staged in 2 GiB, no prefetch
def test_a_first_render_captures_at_its_first_unet_call(full_size, plan, monkeypatch):
    """The stand-in's call (model_warm.py) is the eager call a signature needs before its capture:
    a fresh engine's first render calls its U-Net only inside a capture (resident plan, and staged
    in 2 GiB, every stage's peak within them), and renders what an engine without graphs renders.
    (A U-Net prefetched during the text stage is built before its stage: no warm-up then.)"""
    from sdterm.engine.networks.unet import UNetModel

    req = small_request(width=512, height=512, steps=3, negative="blurry")
    eager = Engine(full_size, "cuda", plan=plan)
    eager.cuda_graphs = False
    want = eager.generate(req).latents
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    calls = []
    forward = UNetModel.forward
    monkeypatch.setattr(UNetModel, "forward", lambda self, *a: calls.append(
        (id(self), torch.cuda.is_current_stream_capturing())) or forward(self, *a))
    engine = Engine(full_size, "cuda", plan=plan)
    r = engine.generate(req)
    unet = id(engine.models.module("unet"))
    assert [capturing for who, capturing in calls if who == unet] == [True], calls
    assert [capturing for who, capturing in calls if who != unet] == [False]  # the stand-in's one call
    assert engine.unet_graphs.captures == 1 and not engine.unet_graphs.failures
    assert ("unet staged" in r.plan) == (plan is not None), r.plan
    if plan is not None:
        for s in r.stages:
            assert s.peak_allocated <= plan.budget, (s.stage, s.peak_allocated / MiB, r.plan)
    assert torch.equal(r.latents, want)


PRIMARY_CONTEXT_STATE = """
driver = ctypes.CDLL("libcuda.so.1")
device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
got = driver.cuDeviceGet(ctypes.byref(device), 0)  # CUDA_ERROR_NOT_INITIALIZED (3) without cuInit
state = driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) if got == 0 else None
"""
"""Probe lines (after ``import ctypes``): whether the driver is started (``got``) and device 0's
primary context is active (``state``, ``active``), asked of the driver itself."""

CONTEXT_PROBE = """
import ctypes, json, threading
import torch
from sdterm.engine.memory.cuda_start import start_cuda
start_cuda("cuda", first_calls=True)
for thread in threading.enumerate():
    if thread.name == "sdterm-cuda-init":
        thread.join()
""" + PRIMARY_CONTEXT_STATE + """
print(json.dumps({"get": got, "state": state, "active": active.value, "torch": torch.cuda.is_initialized()}))
"""


def test_start_cuda_leaves_the_device_context_made_on_its_own_thread():
    """In a fresh process, once the start thread (its first calls included) has ended and before
    this thread has touched CUDA: the driver is up, torch is initialised, and the device's primary
    context is active (made there, not by the render's first call)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CONTEXT_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"get": 0, "state": 0, "active": 1, "torch": True}


DRIVER_PROBE = """
import ctypes, json, sys
from sdterm.engine.memory.cuda_driver import start_driver, wait_driver
start_driver(0)
wait_driver()
torch_before = "torch" in sys.modules
""" + PRIMARY_CONTEXT_STATE + """
import torch
x = torch.ones(4, device="cuda") * 2
current = ctypes.c_void_p()
driver.cuCtxGetCurrent(ctypes.byref(current))
primary = ctypes.c_void_p()
driver.cuDevicePrimaryCtxRetain(ctypes.byref(primary), device)
print(json.dumps({"torch_before": torch_before, "get": got, "state": state, "active": active.value,
                  "sum": float(x.sum()), "same": current.value == primary.value}))
"""


def test_the_driver_thread_makes_the_primary_context_torch_then_uses():
    """In a fresh process, before torch is imported: the driver thread (cuda_driver.py) starts the
    driver and makes the device's primary context; torch, imported after, computes in that same
    context."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", DRIVER_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"torch_before": False, "get": 0, "state": 0, "active": 1, "sum": 8.0, "same": True}


def test_the_process_first_calls_run_on_the_device_and_keep_nothing():
    """What the start thread runs, on a thread of its own (it would swallow an error: called here
    directly), in a process that has used cuBLAS before (its workspaces are dropped too, so
    "nothing kept" is at most)."""
    import threading

    from sdterm.engine.memory.cuda_start import first_calls_of_models

    failed = []
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    def run():
        try:
            first_calls_of_models(torch.device("cuda"))
        except Exception as exc:  # handed to the test's thread
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not failed, failed
    # At most what was there: cuBLAS's workspaces (every thread's) are dropped, as a capture does.
    assert torch.cuda.memory_allocated() <= before, (before, torch.cuda.memory_allocated())
