"""The engine on the demo model: events, cancellation, prompts, full-size architecture."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sdterm.config import ModelConfig
from sdterm.engine.events import Notice, StageFinished, StageStarted, StepDone
from sdterm.engine.pipeline import Cancelled
from sdterm.errors import ConfigError
from sdterm.params import Params

from .conftest import small_request


def test_full_size_unet_has_exact_parameter_count():
    from sdterm.engine.networks.unet import UNetModel
    from sdterm.engine.networks.vae import VAEDecoder

    with torch.device("meta"):
        unet = UNetModel(ModelConfig().unet)
        vae = VAEDecoder(ModelConfig().vae)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    # Decoder only: no encoder, no quant_conv.
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in vae.state_dict())


def test_full_size_keys_match_the_original_layout():
    """Spot-check names from sd-v1-4.ckpt / v1-5-pruned-emaonly.safetensors."""
    from sdterm.engine.networks.unet import UNetModel
    from sdterm.engine.networks.vae import VAEDecoder

    with torch.device("meta"):
        u = UNetModel(ModelConfig().unet).state_dict()
        v = VAEDecoder(ModelConfig().vae).state_dict()
    for key, shape in {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "out.2.weight": (4, 320, 3, 3),
        "time_embed.2.weight": (1280, 1280),
    }.items():
        assert tuple(u[key].shape) == shape, key
    for key, shape in {
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }.items():
        assert tuple(v[key].shape) == shape, key


def test_events_come_in_stage_order(demo_engine):
    events = []
    result = demo_engine.generate(small_request(steps=4), emit=events.append)
    kinds = [(type(e).__name__, getattr(e, "stage", None) or getattr(getattr(e, "stats", None), "stage", None))
             for e in events if isinstance(e, (StageStarted, StageFinished))]
    assert kinds == [
        ("StageStarted", "text"), ("StageStarted", "text"), ("StageFinished", "text"),
        ("StageStarted", "unet"), ("StageStarted", "unet"), ("StageFinished", "unet"),
        ("StageStarted", "vae"), ("StageStarted", "vae"), ("StageFinished", "vae"),
    ]
    steps = [e for e in events if isinstance(e, StepDone)]
    assert [s.step for s in steps] == [1, 2, 3, 4] and all(s.total == 4 for s in steps)
    assert [s.stage for s in result.stages] == ["text", "unet", "vae"]


def test_cancel_stops_at_the_next_step(demo_engine):
    seen = []

    def emit(e):
        if isinstance(e, StepDone):
            seen.append(e.step)

    with pytest.raises(Cancelled):
        demo_engine.generate(small_request(steps=10), emit=emit, cancelled=lambda: len(seen) >= 2)
    assert seen == [1, 2]
    # The engine is still usable afterwards.
    assert demo_engine.generate(small_request(steps=2)).image.size == (64, 64)


def test_long_prompt_is_chunked_not_cut(demo_engine):
    notices = []
    words = " ".join(["castle"] * 60)
    from sdterm.engine.prompt.conditioning import chunk_prompt

    tok = chunk_prompt(words, demo_engine.models.tokenizer)
    assert 75 < tok.n_tokens <= 150
    assert len(tok.chunks) == 2 and all(len(c.ids) == 77 for c in tok.chunks)
    demo_engine.generate(small_request(prompt=words), emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any(f"{tok.n_tokens} tokens" in n and "2 chunks" in n for n in notices)
    # The tail of the prompt changes the image: it was not cut off.
    a = demo_engine.generate(small_request(prompt=words + " fox"))
    b = demo_engine.generate(small_request(prompt=words + " sea"))
    assert a.image.tobytes() != b.image.tobytes()


def test_empty_prompt_and_unicode_render(demo_engine):
    notices = []
    r = demo_engine.generate(small_request(prompt=""), emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any("unconditionally" in n for n in notices) and r.image.size == (64, 64)
    r = demo_engine.generate(small_request(prompt="Füchse ☃ 狐\x07\ttab", negative="ünïcode"))
    assert r.image.size == (64, 64)


def test_negative_prompt_and_eta_change_the_image_deterministically(demo_engine):
    base = demo_engine.generate(small_request()).image.tobytes()
    assert demo_engine.generate(small_request(negative="blurry")).image.tobytes() != base
    e1 = demo_engine.generate(small_request(eta=1.0)).image.tobytes()
    assert e1 != base
    assert demo_engine.generate(small_request(eta=1.0)).image.tobytes() == e1


SEED3_64x64_NOISE = [-0.07664429396390915, 0.35988152027130127, -0.7820168137550354, 0.07152773439884186]
"""latents_noise(3, 64, 64)[0].flatten()[:4], recorded with torch 2.13 (CPU): a seed must mean the
same noise in every torch version and on every device (tests/test_cuda.py checks a CUDA render)."""


def test_initial_noise_matches_the_documented_cpu_draw():
    from sdterm.engine.sampling.noise import latents_noise

    x, _ = latents_noise(42, 512, 768)
    ref = torch.randn((1, 4, 96, 64), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(x, ref)
    x, _ = latents_noise(3, 64, 64)
    assert x.flatten()[:4].tolist() == pytest.approx(SEED3_64x64_NOISE, abs=1e-7)
    assert float(x.double().sum()) == pytest.approx(5.112878919579089, abs=1e-6)


def test_request_validation_messages():
    with pytest.raises(ConfigError, match="multiple of 8.*try 64 or 72"):
        Params("x", width=70).validated()
    with pytest.raises(ConfigError, match="cfg must be a finite number"):
        Params("x", cfg=float("nan")).validated()


def test_engine_imports_without_ui_or_omegaconf():
    code = (
        "import sys, sdterm.engine.pipeline, sdterm.engine.loading.demo, sdterm.engine.loading.checkpoint;"
        "bad=[m for m in ('textual','rich','omegaconf') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_variation_seed_mixes_noise_spherically():
    from sdterm.engine.sampling.noise import latents_noise

    base, _ = latents_noise(1, 64, 64)
    other, _ = latents_noise(2, 64, 64)
    assert torch.equal(latents_noise(1, 64, 64, 2, 0.0)[0], base)
    assert torch.allclose(latents_noise(1, 64, 64, 2, 1.0)[0], other, atol=1e-5)
    mid, _ = latents_noise(1, 64, 64, 2, 0.5)
    # Spherical: the mix keeps the norm of Gaussian noise (a linear blend would shrink it ~30%).
    assert abs(mid.norm() / base.norm() - 1) < 0.05
    assert not torch.allclose(mid, base) and not torch.allclose(mid, other)


def test_variation_strength_changes_the_image_a_little(demo_engine):
    a = demo_engine.generate(small_request(seed=5)).latents
    b = demo_engine.generate(small_request(seed=5, subseed=9, subseed_strength=0.1)).latents
    c = demo_engine.generate(small_request(seed=9)).latents
    assert not torch.equal(a, b)
    assert (a - b).norm() < (a - c).norm()


def test_sizes_that_are_multiples_of_8_but_not_64_render(demo_engine):
    """The latent side need not divide by 2^levels: upsampling goes to the skip's size."""
    r = demo_engine.generate(small_request(width=72, height=56))
    assert r.image.size == (72, 56)


def test_odd_latent_sizes_match_diffusers_upsample_rule():
    """With the full-size architecture's three downsamplings, a 65x67 latent still lines up."""
    from sdterm.engine.networks.unet import UNetModel

    cfg = ModelConfig().unet
    tiny = type(cfg)(model_channels=32, channel_mult=(1, 2, 2, 2), attention_resolutions=(), num_heads=2,
                     context_dim=8, num_res_blocks=1)
    unet = UNetModel(tiny).eval()
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 13, 11), torch.tensor([10]), torch.randn(1, 77, 8))
    assert out.shape == (1, 4, 13, 11)


def test_encode_text_runs_the_encoder_on_a_cached_prompt(demo_model, tmp_path):
    """``generate(encode_text=True)`` (the app's warm-up) reads and calls the text encoder even
    where the embedding cache has every chunk; the embeddings, and so the pixels, are the cache's."""
    from sdterm.engine.embedding_cache import EmbeddingCache
    from sdterm.engine.pipeline import Engine, open_model

    req = small_request()
    first = Engine(open_model(demo_model), "cpu", cache=EmbeddingCache(tmp_path / "embeddings")).generate(req)
    engine = Engine(open_model(demo_model), "cpu", cache=EmbeddingCache(tmp_path / "embeddings"))
    built = []
    make = engine.models.factories["text"]
    engine.models.factories["text"] = lambda: built.append("text") or make()
    hit = engine.generate(req)
    assert hit.stages[0].skipped and built == []
    encoded = engine.generate(req, encode_text=True)
    assert not encoded.stages[0].skipped and built == ["text"]
    assert torch.equal(encoded.latents, hit.latents) and torch.equal(hit.latents, first.latents)


def test_warm_up_does_nothing_on_the_cpu(demo_model):
    """``warm_up`` renders only on a GPU (on the CPU a render is slow and kernels need no loading)."""
    from sdterm.engine.pipeline import Engine, open_model
    from sdterm.engine.warmup import warm_up

    engine = Engine(open_model(demo_model), "cpu")
    built = []
    for stage, make in list(engine.models.factories.items()):
        engine.models.factories[stage] = lambda make=make, stage=stage: built.append(stage) or make()
    assert warm_up(engine, 64, 64, 7.5) is False and built == []
