"""LoRA against diffusers on the demo weights (issue 15).

A kohya-format and a PEFT-format LoRA are made here for the demo architecture (U-Net attention,
LoCon 3x3 and 1x1 convolutions, time embedding, down/upsamplers, text-encoder layers) and loaded
by diffusers' own ``load_lora_weights`` + ``fuse_lora(lora_scale=W)`` into a pipeline built on the
same weights as ``sdterm bench``'s reference. sdterm renders with ``<lora:NAME:W>`` tags; then
its merged weights, U-Net and text-encoder outputs and the image must agree with diffusers'.

Layers are paired through diffusers' own LDM -> diffusers U-Net converter (not sdterm's table),
so the key mapping under test is checked by someone else's. Kinds diffusers can't load (LDM-style
kohya names, Tucker ``lora_mid``, ``dyn``, missing alpha, per-layer alphas) are checked against
the formula ``W0 + w * alpha / rank * up @ down`` and, for convolutions, against running the
LoRA's own layers. Refused files (a pickle gadget, SDXL, misfit shapes) are one notice each and
the render goes on without them.

diffusers pitfalls the kohya file steers around (see the LoRA research notes): the text encoder's
self-attention needs all of q/k/v/out_proj, and one alpha for the whole file (diffusers mis-scales
a transformer-block layer whose alpha isn't the file's most common one).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdterm.bench.reference import ReferenceWeights, build_pipeline, reference_weights
from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.events import Notice
from sdterm.engine.loading.checkpoint import UNET_PREFIX
from sdterm.engine.loading.demo import original_state_dict
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.sampling.noise import latents_noise
from sdterm.params import Params

pytestmark = pytest.mark.usefixtures("one_thread")

REL_TOL = 1e-4
ALPHA = 2.0
"""One alpha for every layer of the files diffusers loads (ranks 4 and 8: scales 0.5 and 0.25)."""

# diffusers module path -> rank. Every kind of layer a LoRA touches in SD v1.
KOHYA_UNET = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 4,
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": 4,  # cross-attention: context in
    "down_blocks.0.attentions.0.proj_in": 8,  # 1x1 conv, 4-D weights
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": 4,  # GEGLU
    "down_blocks.0.resnets.0.conv1": 4,  # LoCon: 3x3 down, 1x1 up
    "down_blocks.1.resnets.1.conv1": 4,
    "down_blocks.1.resnets.0.time_emb_proj": 8,
    "down_blocks.0.downsamplers.0.conv": 4,
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": 4,
    "mid_block.resnets.1.conv2": 8,
    "up_blocks.0.upsamplers.0.conv": 4,
    "up_blocks.0.resnets.2.conv2": 4,
    "up_blocks.1.resnets.1.conv_shortcut": 4,
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k": 8,
    "up_blocks.1.attentions.0.proj_out": 4,
}
KOHYA_TEXT = [f"encoder.layers.1.{n}" for n in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
PEFT_UNET = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 4,  # also in the kohya file: the sum
    "down_blocks.0.resnets.1.conv2": 4,
    "mid_block.attentions.0.proj_out": 4,
    "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2": 4,
    "up_blocks.1.resnets.0.conv1": 4,
    "conv_in": 4,
    "time_embedding.linear_2": 4,
}
PEFT_TEXT = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj", "encoder.layers.0.mlp.fc2",
             "encoder.layers.1.mlp.fc1"]  # the last also in the kohya file


# --------------------------------------------------------------------------------------------
# LoRA files
# --------------------------------------------------------------------------------------------


def _pair(shape: torch.Size, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight of ``shape``: Linear [r, in] / [out, r]; Conv2d LoCon [r, in, kh, kw] /
    [out, r, 1, 1]. Random but not tiny: the delta is of the order of the weights."""
    if len(shape) == 2:
        return torch.randn(rank, shape[1], generator=gen) * 0.3, torch.randn(shape[0], rank, generator=gen) * 0.3
    return (torch.randn(rank, *shape[1:], generator=gen) * 0.3,
            torch.randn(shape[0], rank, 1, 1, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def shapes(demo_model):
    """Weight shapes by diffusers module path ("unet" and "text"), from diffusers' own models."""
    pipe = _plain_pipe(demo_model)
    return {"unet": {n: m.weight.shape for n, m in pipe.unet.named_modules() if hasattr(m, "weight")},
            "text": {n: m.weight.shape for n, m in pipe.text_encoder.named_modules() if hasattr(m, "weight")}}


@pytest.fixture(scope="module")
def kohya_sd(shapes) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(101)
    sd = {}
    for path, rank in KOHYA_UNET.items():
        down, up = _pair(shapes["unet"][path], rank, gen)
        key = "lora_unet_" + path.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
    for path in KOHYA_TEXT:
        down, up = _pair(shapes["text"][path], 4, gen)
        key = "lora_te_text_model_" + path.replace(".", "_")
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)})
    return sd


@pytest.fixture(scope="module")
def peft_sd(shapes) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(202)
    sd = {}
    for path, rank in PEFT_UNET.items():
        down, up = _pair(shapes["unet"][path], rank, gen)
        sd.update({f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up})
    for path in PEFT_TEXT:
        down, up = _pair(shapes["text"][path], 4, gen)
        sd.update({f"text_encoder.text_model.{path}.lora_A.weight": down,
                   f"text_encoder.text_model.{path}.lora_B.weight": up})
    return sd


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, kohya_sd, peft_sd) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    save_file(kohya_sd, str(folder / "kohya.safetensors"))
    save_file(peft_sd, str(folder / "peft.safetensors"))
    save_file({k: v for k, v in kohya_sd.items() if k.startswith("lora_te_")}, str(folder / "te_only.safetensors"))
    return folder


# --------------------------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------------------------


def _plain_pipe(demo_model):
    """diffusers' pipeline on the demo weights (as ``sdterm bench`` builds it), fp32, with its own
    copies of the weights (fusing must not write into an engine's)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    engine = Engine(open_model(demo_model), "cpu")
    w = reference_weights(engine)
    w = ReferenceWeights({k: v.clone() for k, v in w.unet.items()}, {k: v.clone() for k, v in w.vae.items()})
    return build_pipeline(engine, w, torch.float32)


def reference(demo_model, *loras: tuple[dict, float, float]):
    """A diffusers pipeline with each (state dict, te weight, unet weight) loaded by
    ``load_lora_weights``, fused per component with ``fuse_lora(lora_scale=...)`` and unloaded,
    one LoRA after the other (with two adapters loaded at once, diffusers 0.42 multiplies the
    second one's unet scale by the first one's ``lora_scale``)."""
    pipe = _plain_pipe(demo_model)
    for sd, te, unet in loras:
        pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="lora")
        pipe.fuse_lora(components=["text_encoder"], lora_scale=te, adapter_names=["lora"])
        pipe.fuse_lora(components=["unet"], lora_scale=unet, adapter_names=["lora"])
        pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
    return pipe


@pytest.fixture(scope="module")
def ldm_name(demo_model) -> dict[str, str]:
    """diffusers U-Net parameter name -> sdterm's (LDM) parameter name, found by diffusers' own
    converter: each LDM tensor is filled with its own index and looked up after conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdterm.bench.reference import diffusers_unet_kwargs

    engine = Engine(open_model(demo_model), "cpu")
    sd = original_state_dict(engine.models.module("text"), engine.models.module("unet"), engine.models.module("vae"))
    keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    marked = {k: torch.full(sd[k].shape, float(i)) for i, k in enumerate(keys)}
    with torch.device("meta"):
        cfg = dict(UNet2DConditionModel(**diffusers_unet_kwargs(engine.models.cfg.unet)).config)
    converted = convert_ldm_unet_checkpoint(marked, cfg)
    out = {dk: keys[int(v.flatten()[0])].removeprefix(UNET_PREFIX) for dk, v in converted.items()}
    assert len(set(out.values())) == len(keys) == len(out)
    return out


def sdterm_unet(engine, ldm_name) -> dict[str, torch.Tensor]:
    """sdterm's U-Net weights under diffusers' names."""
    sd = engine.models.module("unet").state_dict()
    return {dk: sd[lk] for dk, lk in ldm_name.items()}


def text_state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def lora_engine(demo_model, lora_dir, **kw) -> Engine:
    return Engine(open_model(demo_model), "cpu", lora_dirs=[lora_dir], **kw)


def render(engine, prompt: str, **kw):
    """(Result, the Notice events) of a small DDIM render."""
    events = []
    base = {"prompt": prompt, "negative": "blurry", "seed": 3, "steps": 2, "width": 64, "height": 64, "sampler": "DDIM"}
    base.update(kw)
    result = engine.generate(Params(**base), emit=events.append)
    return result, [e for e in events if isinstance(e, Notice)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel_tol: float = REL_TOL) -> None:
    """Relative L2 error below ``rel_tol`` and the largest element error small against the scale
    (as test_numerics_diffusers)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.double(), expected.double()
    scale = expected.norm()
    assert scale > 0
    rel = float((actual - expected).norm() / scale)
    max_abs = float((actual - expected).abs().max())
    assert rel < rel_tol, f"relative error {rel:.3e} >= {rel_tol:g}"
    assert max_abs <= rel_tol * float(expected.abs().max()), f"max abs diff {max_abs:.3e}"


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_weights_match(got: dict, want: dict, plain: dict, expected_changed: set[str], what: str) -> None:
    """Every tensor of ``got`` equals ``want`` (fp32 rounding); the tensors that differ from
    ``plain`` are exactly ``expected_changed`` on both sides (none dropped, none extra)."""
    assert set(got) == set(want)
    changed_got = {k for k in got if not torch.equal(got[k], plain[k])}
    changed_want = {k for k in want if not torch.equal(want[k], plain[k])}
    assert changed_want == expected_changed, f"diffusers ({what}) fused {sorted(changed_want ^ expected_changed)}"
    assert changed_got == expected_changed, f"sdterm ({what}) differs on {sorted(changed_got ^ expected_changed)}"
    for k in sorted(expected_changed):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{what} {k}: {m}")
        assert rel_change(got[k], plain[k]) > 0.05, f"{what} {k}: the LoRA's delta is too small to test"


def expected_layers(unet: dict | list, text: list) -> tuple[set[str], set[str]]:
    return {f"{p}.weight" for p in unet}, {f"{p}.weight" for p in text}


def check_against(engine, pipe, plain_pipe, ldm_name, unet_layers: set[str], text_layers: set[str]) -> None:
    """(a) merged weights, (b) U-Net and text-encoder outputs of sdterm's engine vs diffusers' fused pipeline."""
    # (a) weights
    assert_weights_match(sdterm_unet(engine, ldm_name), pipe.unet.state_dict(), plain_pipe.unet.state_dict(),
                         unet_layers, "unet")
    assert_weights_match(text_state(engine.models.module("text")), text_state(pipe.text_encoder),
                         text_state(plain_pipe.text_encoder), text_layers, "text")
    # (b) outputs
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    ctx = torch.randn((2, 77, 32), generator=gen)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        ours = engine.models.module("unet")(x, t, ctx)
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        plain = plain_pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert_close(ours, theirs)
    if unet_layers:
        assert rel_change(theirs, plain) > 1e-2, "the LoRA barely changes the U-Net's output"
    ids = pipe.tokenizer("a red fox, snow", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = engine.models.module("text")(ids).last_hidden_state
        theirs = pipe.text_encoder(ids).last_hidden_state
        plain = plain_pipe.text_encoder(ids).last_hidden_state
    assert_close(ours, theirs)
    if text_layers:
        assert rel_change(theirs, plain) > 1e-2, "the LoRA barely changes the text encoder's output"


@pytest.fixture(scope="module")
def plain_pipe(demo_model):
    return _plain_pipe(demo_model)


# --------------------------------------------------------------------------------------------
# Against diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,weight", [("kohya", 1.0), ("kohya", 0.5), ("kohya", -0.7), ("peft", 1.0),
                                         ("peft", -0.7)])
def test_one_lora_matches_diffusers_fuse_lora(demo_model, lora_dir, kohya_sd, peft_sd, ldm_name, plain_pipe,
                                              name, weight):
    engine = lora_engine(demo_model, lora_dir)
    result, notices = render(engine, f"a red fox <lora:{name}:{weight:g}>")
    assert not notices, notices
    assert [(d["name"], d["te"], d["unet"]) for d in result.loras] == [(name, weight, weight)]
    sd, unet, text = (kohya_sd, KOHYA_UNET, KOHYA_TEXT) if name == "kohya" else (peft_sd, PEFT_UNET, PEFT_TEXT)
    pipe = reference(demo_model, (sd, weight, weight))
    check_against(engine, pipe, plain_pipe, ldm_name, *expected_layers(unet, text))


def test_split_weights_are_text_encoder_first_then_unet(demo_model, lora_dir, kohya_sd, ldm_name, plain_pipe):
    engine = lora_engine(demo_model, lora_dir)
    result, _ = render(engine, "a red fox <lora:kohya:0.3:0.9>")
    assert [(d["te"], d["unet"]) for d in result.loras] == [(0.3, 0.9)]
    pipe = reference(demo_model, (kohya_sd, 0.3, 0.9))
    check_against(engine, pipe, plain_pipe, ldm_name, *expected_layers(KOHYA_UNET, KOHYA_TEXT))


def test_two_loras_at_once_are_the_sum(demo_model, lora_dir, kohya_sd, peft_sd, ldm_name, plain_pipe):
    engine = lora_engine(demo_model, lora_dir)
    result, _ = render(engine, "a red fox <lora:kohya:0.8> <lora:peft:-0.6:0.4>")
    assert [d["name"] for d in result.loras] == ["kohya", "peft"]
    pipe = reference(demo_model, (kohya_sd, 0.8, 0.8), (peft_sd, -0.6, 0.4))
    unet, text = expected_layers({**KOHYA_UNET, **PEFT_UNET}, KOHYA_TEXT + PEFT_TEXT)
    check_against(engine, pipe, plain_pipe, ldm_name, unet, text)
    # The shared layers hold both deltas (diffusers agreed above; here: neither delta alone).
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    for alone in (reference(demo_model, (kohya_sd, 0.8, 0.8)), reference(demo_model, (peft_sd, -0.6, 0.4))):
        assert rel_change(sdterm_unet(engine, ldm_name)[to_q], alone.unet.state_dict()[to_q]) > 0.05


def test_the_image_matches_diffusers_pipeline(demo_model, lora_dir, kohya_sd, peft_sd):
    """(c) The whole render, DDIM eta 0, from the same x_T: sdterm's ``generate`` vs diffusers'
    pipeline with the same prompts. The plain model agrees to ~1e-3 relative in the latents here
    (sdterm keeps conditionings in fp16 and normalises A1111-style), so the bound is the pixels
    (within one level of 255) and latents within 2e-3, while the LoRA moves them far more."""
    steps, seed = 6, 3
    prompt = "a red fox <lora:kohya:0.8> <lora:peft:-0.6:0.5>"
    engine = lora_engine(demo_model, lora_dir)
    ours, _ = render(engine, prompt, steps=steps, seed=seed, cfg=7.5)
    plain, _ = render(lora_engine(demo_model, lora_dir), "a red fox", steps=steps, seed=seed, cfg=7.5)
    pipe = reference(demo_model, (kohya_sd, 0.8, 0.8), (peft_sd, -0.6, 0.5))
    x_T, _ = latents_noise(seed, 64, 64)
    kw = {"prompt": "a red fox ", "negative_prompt": "blurry", "num_inference_steps": steps, "guidance_scale": 7.5}
    with torch.no_grad():
        latents = pipe(latents=x_T.clone(), output_type="latent", **kw).images
        image = pipe(latents=x_T.clone(), output_type="np", **kw).images[0]
    assert_close(ours.latents, latents, rel_tol=2e-3)
    assert rel_change(plain.latents, latents) > 0.05, "the LoRAs barely change the image"
    a, b = np.asarray(ours.image, dtype=np.int16), np.round(image * 255).astype(np.int16)
    assert np.abs(a - b).max() <= 1
    assert np.abs(np.asarray(plain.image, dtype=np.int16) - b).mean() > 5


def test_weight_zero_is_the_plain_model(demo_model, lora_dir):
    engine = lora_engine(demo_model, lora_dir)
    plain_engine = lora_engine(demo_model, lora_dir)
    zero, _ = render(engine, "a red fox <lora:kohya:0> <lora:peft:0>")
    plain, _ = render(plain_engine, "a red fox")
    assert zero.image.tobytes() == plain.image.tobytes()
    for stage in ("unet", "text"):
        a, b = engine.models.module(stage).state_dict(), plain_engine.models.module(stage).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), stage


# --------------------------------------------------------------------------------------------
# Re-weighting and dropping
# --------------------------------------------------------------------------------------------


def test_dropping_restores_and_reweighting_rewrites_only_its_layers(demo_model, lora_dir, ldm_name, monkeypatch):
    engine = lora_engine(demo_model, lora_dir)
    first, _ = render(engine, "a red fox")
    pristine = {s: {k: v.clone() for k, v in engine.models.module(s).state_dict().items()} for s in ("unet", "text")}
    names = {s: {id(m): n for n, m in engine.models.module(s).named_modules()} for s in ("unet", "text")}
    written: list[tuple[str, set[str]]] = []
    offload = engine.placement.offload_modules

    def spy(stage, modules):
        written.append((stage, {names[stage][id(m)] for m in modules}))
        return offload(stage, modules)

    monkeypatch.setattr(engine.placement, "offload_modules", spy)
    # sdterm's names of each file's layers, through diffusers' converter
    kohya_unet = {ldm_name[f"{p}.weight"].removesuffix(".weight") for p in KOHYA_UNET}
    peft_unet = {ldm_name[f"{p}.weight"].removesuffix(".weight") for p in PEFT_UNET}
    kohya_text = {p.removeprefix("encoder.") for p in KOHYA_TEXT}
    peft_text = {p.removeprefix("encoder.") for p in PEFT_TEXT}

    def text_names(s: set[str]) -> set[str]:  # CLIPTextModel's module names, nested or not
        return {n.split("encoder.", 1)[-1] for n in s}

    render(engine, "a red fox <lora:kohya:1> <lora:peft:1>")
    assert written and {s for s, _ in written} == {"unet", "text"}
    both = {s: {k: v.clone() for k, v in engine.models.module(s).state_dict().items()} for s in ("unet", "text")}

    written.clear()
    render(engine, "a red fox <lora:kohya:1> <lora:peft:1>", seed=4)
    assert written == [], "the same LoRAs and weights were merged again"

    written.clear()
    render(engine, "a red fox <lora:kohya:0.5> <lora:peft:1>")
    by_stage = {s: n for s, n in written}
    assert by_stage["unet"] == kohya_unet
    assert text_names(by_stage["text"]) == kohya_text
    now = {s: engine.models.module(s).state_dict() for s in ("unet", "text")}
    assert peft_unet - kohya_unet and peft_unet & kohya_unet  # layers of its own, and a shared one
    for s in ("unet", "text"):
        for k, v in now[s].items():
            layer = k.removesuffix(".weight")
            in_kohya = layer in kohya_unet if s == "unet" else text_names({layer}) <= kohya_text
            if not in_kohya:
                assert torch.equal(v, both[s][k]), f"{s} {k} was rewritten though only kohya's weight changed"
            elif k.endswith(".weight"):
                assert not torch.equal(v, both[s][k]), f"{s} {k} kept kohya's old weight"
    assert peft_text - kohya_text  # the PEFT file has text layers of its own, left alone above

    last, _ = render(engine, "a red fox")
    for s in ("unet", "text"):
        after = engine.models.module(s).state_dict()
        assert all(torch.equal(after[k], pristine[s][k]) for k in after), f"{s}: dropping the LoRAs left weights changed"
    assert last.image.tobytes() == first.image.tobytes()
    assert not engine.loras.mergers["unet"].pristine and not engine.loras.mergers["text"].pristine


# --------------------------------------------------------------------------------------------
# Against the formula (files diffusers can't load)
# --------------------------------------------------------------------------------------------


def _kohya(key: str, down, up, alpha=None, mid=None) -> dict[str, torch.Tensor]:
    sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    if mid is not None:
        sd[f"{key}.lora_mid.weight"] = mid
    return sd


@pytest.fixture(scope="module")
def formula_dir(tmp_path_factory):
    """LoRAs diffusers can't load: LDM-style kohya names, per-layer alphas, no alpha, Tucker."""
    gen = torch.Generator().manual_seed(303)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.3
    folder = tmp_path_factory.mktemp("formula")
    ldm = {
        # sdterm layer name: (file key, down, up, alpha)
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                                                             r(4, 32), r(32, 4), 1.0),
        "input_blocks.4.0.in_layers.2": ("lora_unet_input_blocks_4_0_in_layers_2", r(4, 32, 3, 3), r(64, 4, 1, 1), 3.0),
        "output_blocks.2.1.conv": ("lora_unet_output_blocks_2_1_conv", r(8, 64, 3, 3), r(64, 8, 1, 1), 2.0),
        "middle_block.1.proj_in": ("lora_unet_middle_block_1_proj_in", r(4, 64, 1, 1), r(64, 4, 1, 1), 8.0),
        "output_blocks.5.0.skip_connection": ("lora_unet_output_blocks_5_0_skip_connection",
                                              r(4, 64, 1, 1), r(32, 4, 1, 1), 0.5),
        "text_model.encoder.layers.0.self_attn.k_proj": ("lora_te_text_model_encoder_layers_0_self_attn_k_proj",
                                                         r(4, 32), r(32, 4), 6.0),
    }
    sd = {}
    for key, down, up, alpha in ldm.values():
        sd.update(_kohya(key, down, up, alpha))
    save_file(sd, str(folder / "ldm.safetensors"))
    noalpha = {"input_blocks.2.1.transformer_blocks.0.attn2.to_v":
               ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v", r(4, 32), r(32, 4), None)}
    save_file(_kohya(*next(iter(noalpha.values()))), str(folder / "noalpha.safetensors"))
    tucker = ("lora_unet_down_blocks_0_resnets_1_conv1", r(4, 32, 1, 1), r(32, 4, 1, 1), 2.0, r(4, 4, 3, 3))
    save_file(_kohya(*tucker), str(folder / "tucker.safetensors"))
    return folder, ldm, noalpha, tucker


def _weights(engine) -> dict[str, torch.Tensor]:
    out = {f"unet:{k}": v.clone() for k, v in engine.models.module("unet").state_dict().items()}
    for k, v in engine.models.module("text").state_dict().items():
        out[f"text:text_model.{k.removeprefix('text_model.')}"] = v.clone()
    return out


def _layer_key(layer: str) -> str:
    return f"{'text' if layer.startswith('text_model.') else 'unet'}:{layer}.weight"


def _check_formula(before, after, expected: dict[str, torch.Tensor]) -> None:
    """``after`` = ``before`` + ``expected`` deltas on those layers, and equal elsewhere."""
    keys = {_layer_key(layer): d for layer, d in expected.items()}
    for k in before:
        if k in keys:
            torch.testing.assert_close(after[k] - before[k], keys[k].reshape(before[k].shape), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, k=k: f"{k}: {m}")
            assert rel_change(after[k], before[k]) > 0.05
        else:
            assert torch.equal(after[k], before[k]), f"{k} changed though the LoRA doesn't touch it"


def test_ldm_style_kohya_names_and_per_layer_alphas_follow_the_formula(demo_model, formula_dir):
    folder, ldm, _, _ = formula_dir
    engine = lora_engine(demo_model, folder)
    render(engine, "fox")
    before = _weights(engine)
    _, notices = render(engine, "fox <lora:ldm:0.4:0.7>")
    assert not notices
    expected = {layer: (0.4 if layer.startswith("text_model.") else 0.7) * alpha / down.shape[0]
                * (up.flatten(1) @ down.flatten(1)) for layer, (_, down, up, alpha) in ldm.items()}
    _check_formula(before, _weights(engine), expected)

    # A LoCon conv merged is the LoRA's own two convolutions run beside the layer.
    after = _weights(engine)
    _, down, up, alpha = ldm["input_blocks.4.0.in_layers.2"]
    k = _layer_key("input_blocks.4.0.in_layers.2")
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    merged = F.conv2d(x, after[k], padding=1) - F.conv2d(x, before[k], padding=1)
    assert_close(merged, 0.7 * alpha / 4 * F.conv2d(F.conv2d(x, down, padding=1), up))


def test_dyn_keeps_the_first_ranks_with_the_full_ranks_scale(demo_model, formula_dir):
    folder, ldm, _, _ = formula_dir
    engine = lora_engine(demo_model, folder)
    render(engine, "fox")
    before = _weights(engine)
    render(engine, "fox <lora:ldm:1:0.6:2>")
    expected = {layer: (1.0 if layer.startswith("text_model.") else 0.6) * alpha / down.shape[0]
                * (up.flatten(1)[:, :2] @ down.flatten(1)[:2]) for layer, (_, down, up, alpha) in ldm.items()}
    _check_formula(before, _weights(engine), expected)


def test_missing_alpha_is_scale_one(demo_model, formula_dir):
    folder, _, noalpha, _ = formula_dir
    engine = lora_engine(demo_model, folder)
    render(engine, "fox")
    before = _weights(engine)
    render(engine, "fox <lora:noalpha:0.9>")
    _check_formula(before, _weights(engine), {layer: 0.9 * (up @ down) for layer, (_, down, up, _) in noalpha.items()})


def test_tucker_lora_mid_is_the_three_convolutions(demo_model, formula_dir):
    folder, _, _, (_, down, up, alpha, mid) = formula_dir
    engine = lora_engine(demo_model, folder)
    render(engine, "fox")
    before = _weights(engine)
    _, notices = render(engine, "fox <lora:tucker:0.8>")
    assert not notices
    after = _weights(engine)
    k = _layer_key("input_blocks.2.0.in_layers.2")
    assert [n for n in before if not torch.equal(before[n], after[n])] == [k]
    x = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    merged = F.conv2d(x, after[k], padding=1) - F.conv2d(x, before[k], padding=1)
    lora = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    assert_close(merged, 0.8 * alpha / 4 * lora)


# --------------------------------------------------------------------------------------------
# Refusals, unmatched keys, infotext
# --------------------------------------------------------------------------------------------


class _Gadget:
    """Unpickling this calls os.mkdir(marker): a visible side effect if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _one_warning_about(notices: list[Notice], path_part: str, *words: str) -> str:
    hits = [n for n in notices if path_part in n.message]
    assert len(hits) == 1, notices
    (n,) = hits
    assert n.level == "warning" and "\n" not in n.message, n
    for w in words:
        assert w in n.message, (w, n.message)
    return n.message


def test_refused_files_are_one_notice_and_the_render_goes_on(demo_model, tmp_path, kohya_sd):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "loras"
    folder.mkdir()
    # a control: a plain .pt LoRA loads through the safe unpickler
    torch.save({k: v for k, v in kohya_sd.items() if "attn1_to_q" in k}, folder / "safe.pt")
    torch.save({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": _Gadget(marker),
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(32, 4)},
               folder / "evil.pt")
    xl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 1280),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1280, 4)}
    xl.update({k: v for k, v in kohya_sd.items() if "attn1_to_q" in k})
    save_file(xl, str(folder / "xl.safetensors"))
    save_file(_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     torch.ones(4, 320), torch.ones(320, 4), 4), str(folder / "misfit.safetensors"))

    plain, _ = render(lora_engine(demo_model, folder), "a red fox")
    safe, notices = render(lora_engine(demo_model, folder), "a red fox <lora:safe:1>")
    assert not notices and safe.image.tobytes() != plain.image.tobytes()

    for name, words in (("evil", ("refused",)), ("xl", ("SDXL",)), ("misfit", ("another model",))):
        engine = lora_engine(demo_model, folder)
        result, notices = render(engine, f"a red fox <lora:{name}:1>")
        _one_warning_about(notices, f"{name}.", *words)
        assert result.image.tobytes() == plain.image.tobytes(), name
        assert result.loras == [] and "Lora hashes" not in result.infotext_extra
        assert not marker.exists(), "the pickle's code ran"


def test_unmatched_keys_are_counted_in_a_notice(demo_model, tmp_path, kohya_sd):
    folder = tmp_path / "loras"
    folder.mkdir()
    sd = {k: v for k, v in kohya_sd.items() if "attn1_to_q" in k}
    for bogus in ("lora_unet_foo_blocks_0_bar", "lora_te_text_model_encoder_layers_9_mlp_fc1",
                  "lora_unet_down_blocks_7_attentions_0_proj_in"):
        sd.update(_kohya(bogus, torch.ones(4, 32), torch.ones(32, 4), 1))
    save_file(sd, str(folder / "partial.safetensors"))
    plain, _ = render(lora_engine(demo_model, folder), "a red fox")
    result, notices = render(lora_engine(demo_model, folder), "a red fox <lora:partial:1>")
    _one_warning_about(notices, "partial", "3 ")
    assert result.image.tobytes() != plain.image.tobytes()  # the layers that match are used
    assert [d["name"] for d in result.loras] == ["partial"]


def test_lora_hashes_infotext_is_a1111s_short_hash(demo_model, lora_dir):
    result, _ = render(lora_engine(demo_model, lora_dir), "a fox <lora:kohya:0.5> <lora:peft:1>")

    def addnet(path: Path) -> str:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert "sshs_model_hash" not in (json.loads(data[8:8 + n]).get("__metadata__") or {})
        return hashlib.sha256(data[8 + n:]).hexdigest()[:12]

    assert result.infotext_extra["Lora hashes"] == (f"kohya: {addnet(lora_dir / 'kohya.safetensors')}, "
                                                    f"peft: {addnet(lora_dir / 'peft.safetensors')}")


# --------------------------------------------------------------------------------------------
# The embedding cache
# --------------------------------------------------------------------------------------------


def test_a_text_encoder_lora_is_part_of_the_embedding_cache_key(demo_model, lora_dir, tmp_path):
    """te_only changes only the text encoder: a cache that served the plain conditioning for the
    LoRA prompt (or the other way round) would give the other image."""
    cache = tmp_path / "cache"
    eng = lambda: lora_engine(demo_model, lora_dir, cache=EmbeddingCache(cache))
    plain, _ = render(eng(), "a red fox")
    lora, _ = render(eng(), "a red fox <lora:te_only:1>")
    assert (plain.stages[0].cache, lora.stages[0].cache) == ("miss", "miss")
    assert lora.image.tobytes() != plain.image.tobytes()
    # each is served from the cache now, and to itself
    again_lora, _ = render(eng(), "a red fox <lora:te_only:1>")
    again_plain, _ = render(eng(), "a red fox")
    assert (again_lora.stages[0].cache, again_plain.stages[0].cache) == ("hit", "hit")
    assert again_lora.image.tobytes() == lora.image.tobytes()
    assert again_plain.image.tobytes() == plain.image.tobytes()
    # another weight is another conditioning
    other, _ = render(eng(), "a red fox <lora:te_only:0.5>")
    assert other.stages[0].cache == "miss" and other.image.tobytes() not in (plain.image.tobytes(),
                                                                             lora.image.tobytes())


def test_a_text_encoder_let_go_holds_its_lora_again_when_it_comes_back(demo_model, lora_dir, tmp_path):
    """``keep_text`` off (a one-shot command): the encoder goes after its stage, LoRA and all; a
    later render that needs it builds it from the file and merges the same LoRA into it again."""
    from sdterm.engine.embedding_cache import EmbeddingCache

    engine = lora_engine(demo_model, lora_dir, cache=EmbeddingCache(tmp_path / "embeddings"))
    engine.keep_text = False
    render(engine, "a fox <lora:te_only:0.8>")
    again, _ = render(engine, "a cat <lora:te_only:0.8>")
    fresh, _ = render(lora_engine(demo_model, lora_dir), "a cat <lora:te_only:0.8>")
    assert torch.equal(again.latents, fresh.latents)

