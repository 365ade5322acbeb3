"""The VAE encoder (issue 16's first block): against diffusers' AutoencoderKL on the demo weights,
the full-size layout against SD v1's keys, loading from the checkpoint or an external VAE file,
a pruned checkpoint without one, and the demo's other weights left bit-identical."""

from __future__ import annotations

import copy
import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdterm.config import ModelConfig
from sdterm.engine.loading.checkpoint import VAE_PREFIX, CheckpointError
from sdterm.engine.loading.demo import demo_config, demo_encoder, demo_modules, original_state_dict, write_demo_model
from sdterm.engine.loading.models import Models, open_model
from sdterm.engine.memory.tiling import encode_images, encode_latents
from sdterm.engine.networks.vae import VAEDecoder, VAEEncoder

from .conftest import small_request

pytestmark = pytest.mark.usefixtures("one_thread")


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1] with some detail: a ramp plus noise, clipped."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, w)[None, None, None, :] * torch.linspace(1, -1, h)[None, None, :, None]
    return (ramp + 0.3 * torch.randn(b, 3, h, w, generator=gen)).clamp(-1, 1)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


# --------------------------------------------------------------------------------------------
# Numerics against diffusers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg():
    return demo_config(vocab_size=1000)


@pytest.fixture(scope="module")
def encoder(cfg):
    return demo_encoder(cfg, torch.float32, seed=1234)


@pytest.fixture(scope="module")
def diffusers_vae(cfg, encoder):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sdterm.bench.reference import diffusers_vae_kwargs

    checkpoint = original_state_dict(*demo_modules(cfg, torch.float32, seed=1234), encoder)
    model = AutoencoderKL(**{**diffusers_vae_kwargs(cfg.vae), "sample_size": 64})
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(model.config))
    assert len(converted) == sum(k.startswith(VAE_PREFIX) for k in checkpoint)
    model.load_state_dict(converted, strict=True)  # encoder and decoder, every tensor from the demo
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 32, 64), (1, 3, 96, 40)])
def test_encoder_matches_diffusers_posterior_mean(encoder, diffusers_vae, cfg, shape):
    x = images(*[shape[0], shape[2], shape[3]])
    with torch.no_grad():
        ours = encoder(x)
        theirs = diffusers_vae.encode(x).latent_dist.mean * 0.18215
    assert ours.shape == (shape[0], 4, shape[2] // 8, shape[3] // 8)
    assert float(theirs.abs().max()) > 1e-3
    assert rel_error(ours, theirs) < 1e-4
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


def test_the_scale_is_the_decoders(cfg, encoder):
    assert encoder.scale_factor == cfg.vae.scale_factor == VAEDecoder(cfg.vae).scale_factor == 0.18215


# --------------------------------------------------------------------------------------------
# The full-size layout
# --------------------------------------------------------------------------------------------


def test_full_size_encoder_keys_match_sd_v1():
    """Spot-check names and shapes from v1-5-pruned-emaonly.safetensors, then the whole key set
    and every shape against diffusers' full-size AutoencoderKL through its own converter."""
    with torch.device("meta"):
        enc = VAEEncoder(ModelConfig().vae)
        dec = VAEDecoder(ModelConfig().vae)
    e = enc.state_dict()
    for key, shape in {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.down.2.downsample.conv.bias": (512,),
        "encoder.down.3.block.1.conv1.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.block_2.norm2.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
    }.items():
        assert tuple(e[key].shape) == shape, key
    assert "encoder.down.3.downsample.conv.weight" not in e
    assert not any(k.startswith("encoder.down.") and ".attn." in k for k in e)
    assert sum(p.numel() for p in enc.parameters()) == 34_163_664  # diffusers' encoder + quant_conv at SD v1 size
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sdterm.bench.reference import diffusers_vae_kwargs

    with torch.device("meta"):
        model = AutoencoderKL(**diffusers_vae_kwargs(ModelConfig().vae))
    theirs = model.state_dict()
    ours = {VAE_PREFIX + k: v for k, v in {**enc.state_dict(), **dec.state_dict()}.items()}
    converted = convert_ldm_vae_checkpoint(ours, dict(model.config))
    assert set(converted) == set(theirs), set(converted) ^ set(theirs)
    assert all(tuple(converted[k].shape) == tuple(theirs[k].shape) for k in theirs)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_encoder_is_built_only_when_asked_for(demo_model):
    models = Models(open_model(demo_model), torch.float32)
    for stage in ("text", "unet", "vae"):
        models.module(stage)
    assert "vae_encoder" not in models._modules and models._ckpt is None  # the file was released
    enc = models.module("vae_encoder")
    assert isinstance(enc, VAEEncoder) and models._ckpt is None
    sd = load_file(str(demo_model / "model.safetensors"))
    for name, t in enc.state_dict().items():
        assert torch.equal(t, sd[VAE_PREFIX + name]), name
    assert enc.quant_conv.weight.dtype == torch.float32
    assert Models(open_model(demo_model), torch.float16).module("vae_encoder").quant_conv.weight.dtype == torch.float16


def test_a_checkpoint_without_an_encoder_loads_renders_and_refuses_to_encode(demo_model, tmp_path):
    from sdterm.engine.pipeline import Engine

    sd = load_file(str(demo_model / "model.safetensors"))
    pruned = {k: v for k, v in sd.items() if not k.startswith((VAE_PREFIX + "encoder.", VAE_PREFIX + "quant_conv."))}
    assert len(pruned) < len(sd)
    save_file(pruned, str(tmp_path / "pruned.safetensors"))
    shutil.copytree(demo_model / "tokenizer", tmp_path / "tokenizer")
    engine = Engine(open_model(tmp_path / "pruned.safetensors", config_path=demo_model / "config.yaml"), "cpu")
    engine.generate(small_request(steps=2))
    with pytest.raises(CheckpointError) as err:
        engine.models.module("vae_encoder")
    line = str(err.value)
    assert len(line.splitlines()) == 1 and "pruned.safetensors" in line and "no VAE encoder" in line
    # encoder present but a tensor missing: the strict load names it, still one line
    del sd[VAE_PREFIX + "encoder.mid.attn_1.q.weight"]
    save_file(sd, str(tmp_path / "partial.safetensors"))
    models = Models(open_model(tmp_path / "partial.safetensors", config_path=demo_model / "config.yaml"), torch.float32)
    with pytest.raises(CheckpointError, match="encoder.mid.attn_1.q.weight") as err:
        models.module("vae_encoder")
    assert len(str(err.value).splitlines()) == 1


def test_an_external_vae_file_with_an_encoder_encodes(demo_model, tmp_path):
    sd = load_file(str(demo_model / "model.safetensors"))
    own = {k.removeprefix(VAE_PREFIX): v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    other = {k: v * 0.7 if k.startswith("encoder.") else v for k, v in own.items()}
    save_file(other, str(tmp_path / "full.safetensors"))
    save_file({k: v for k, v in other.items() if k.startswith(("decoder.", "post_quant_conv."))},
              str(tmp_path / "decoder-only.safetensors"))
    x = images(1, 64, 64)
    models = Models(open_model(demo_model), torch.float32)
    with torch.no_grad():
        from_ckpt = models.module("vae_encoder")(x)
        models.set_vae(tmp_path / "full.safetensors")
        enc = models.module("vae_encoder")
        assert torch.equal(enc.encoder.conv_in.weight, other["encoder.conv_in.weight"])
        from_file = enc(x)
        models.set_vae(tmp_path / "decoder-only.safetensors")  # no encoder in the file: the checkpoint's
        assert torch.equal(models.module("vae_encoder")(x), from_ckpt)
        models.set_vae(None)
        assert torch.equal(models.module("vae_encoder")(x), from_ckpt)
    assert not torch.equal(from_file, from_ckpt)
    # with the file given up front, as --vae does
    with torch.no_grad():
        up_front = Models(open_model(demo_model), torch.float32, vae=tmp_path / "full.safetensors")
        assert torch.equal(up_front.module("vae_encoder")(x), from_file)


def test_random_weights_build_a_reproducible_encoder(cfg):
    from sdterm.engine.loading.models import ModelSource

    source = ModelSource(None, cfg, "random", None)
    a = Models(source, torch.float32, random_seed=3).module("vae_encoder")
    b = Models(source, torch.float32, random_seed=3).module("vae_encoder")
    c = Models(source, torch.float32, random_seed=4).module("vae_encoder")
    assert torch.equal(a.encoder.conv_in.weight, b.encoder.conv_in.weight)
    assert not torch.equal(a.encoder.conv_in.weight, c.encoder.conv_in.weight)


# --------------------------------------------------------------------------------------------
# encode_latents: the fp32 re-encode after an fp16 overflow
# --------------------------------------------------------------------------------------------


def test_an_overflowing_half_precision_encode_runs_again_in_fp32(encoder):
    """Biases of 4e4 on conv_in and the first block's conv2: their sum passes fp16's 65504, not fp32's."""
    x = images(1, 64, 64)
    big = copy.deepcopy(encoder)
    with torch.no_grad():
        big.encoder.conv_in.bias.add_(4e4)
        big.encoder.down[0].block[0].conv2.bias.add_(4e4)
        expected = big(x)
    half = copy.deepcopy(big).half()
    assert torch.isfinite(expected).all()
    assert not torch.isfinite(encode_images(half, x, None)).all()
    asked = []
    out = encode_latents(half, x, 16, fp32_tile=lambda t: asked.append(t) or None)
    assert asked == [16] and out.dtype == torch.float32 and half.quant_conv.weight.dtype == torch.float32
    assert rel_error(out, expected) < 1e-2  # fp16-rounded weights, fp32 arithmetic
    assert torch.equal(encode_latents(encoder, x, None), encoder(x))  # finite: one encode, as is


# --------------------------------------------------------------------------------------------
# The demo model: encoder weights added, every other weight bit-identical
# --------------------------------------------------------------------------------------------

DEMO_WEIGHTS_SHA256 = "fe265849781dcf51059b572de3853af875faee0c581f7616c0516afed32a8acf"
"""The demo checkpoint's 446 tensors before the encoder was added (seed 0): sha256 over the sorted
JSON of each tensor's raw-bytes sha256."""


def test_the_demo_weights_other_than_the_encoders_are_unchanged(tmp_path):
    import json

    sd = load_file(str(write_demo_model(tmp_path / "demo") / "model.safetensors"))
    encoder_side = {k for k in sd if k.startswith((VAE_PREFIX + "encoder.", VAE_PREFIX + "quant_conv."))}
    assert len(encoder_side) == 74
    hashes = {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
              for k, v in sd.items() if k not in encoder_side}
    assert len(hashes) == 446
    assert hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest() == DEMO_WEIGHTS_SHA256
