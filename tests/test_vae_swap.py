"""A standalone VAE file instead of the checkpoint's own (``--vae PATH``, ``defaults.vae``,
``Engine.set_vae``): the LDM layout with or without the ``first_stage_model.`` prefix, a
``state_dict``-wrapped .ckpt, A1111's ``VAE hash``/``VAE`` in the infotext; files that aren't a
usable SD v1 VAE refused in one line naming them, a pickle that would run code never run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdterm import paths
from sdterm.engine.loading.checkpoint import CheckpointError
from sdterm.engine.loading.vae_file import verify_vae_file
from sdterm.params import Params

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "5"]
REQ = Params(prompt="a lighthouse", seed=5, steps=2, width=64, height=64)


def demo_vae(demo_model: Path) -> dict[str, torch.Tensor]:
    """The demo checkpoint's own VAE tensors, without the prefix (a standalone VAE file's names)."""
    sd = load_file(str(demo_model / "model.safetensors"))
    return {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}


@pytest.fixture(scope="module")
def vae_files(demo_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    own = demo_vae(demo_model)
    assert own and all(k.startswith(("decoder.", "post_quant_conv.", "encoder.", "quant_conv.")) for k in own)
    save_file(own, str(folder / "same.safetensors"))
    save_file({k: v * 0.7 if k.startswith("decoder.") else v for k, v in own.items()}, str(folder / "other.safetensors"))
    return folder


def render(run_cli, demo_model, outdir, *extra):
    code, out, err = run_cli("generate", "a lighthouse", "--model", demo_model, "--outdir", outdir, "--json",
                             "--device", "cpu", "--no-history", *SMALL, *extra)
    assert code == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    with Image.open(data["path"]) as im:
        return np.asarray(im).copy(), im.text["parameters"], data


def test_the_same_weights_give_the_same_image_and_others_a_different_one(demo_model, vae_files, tmp_path, run_cli):
    own, own_text, _ = render(run_cli, demo_model, tmp_path / "a")
    same, same_text, _ = render(run_cli, demo_model, tmp_path / "b", "--vae", vae_files / "same.safetensors")
    other, other_text, data = render(run_cli, demo_model, tmp_path / "c", "--vae", vae_files / "other.safetensors")
    assert np.array_equal(own, same)
    assert not np.array_equal(own, other), "the VAE file never reached the decoder"
    assert "VAE" not in own_text
    short = hashlib.sha256((vae_files / "other.safetensors").read_bytes()).hexdigest()[:10]
    # A1111's order: right after Model
    assert f"Model: demo, VAE hash: {short}, VAE: other.safetensors," in other_text.splitlines()[-1]
    assert data["infotext_extra"]["VAE"] == "other.safetensors" and data["infotext_extra"]["VAE hash"] == short


def test_a_bare_name_is_a_file_in_the_vae_folder_and_settings_name_it(demo_model, vae_files, tmp_path, run_cli):
    paths.vae_dir().mkdir(parents=True)
    (paths.vae_dir() / "other.safetensors").write_bytes((vae_files / "other.safetensors").read_bytes())
    _, text, _ = render(run_cli, demo_model, tmp_path / "a", "--vae", "other")
    assert "VAE: other.safetensors" in text
    paths.user_config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.user_config_file().write_text("defaults:\n  vae: other.safetensors\n")
    _, text, _ = render(run_cli, demo_model, tmp_path / "b")
    assert "VAE: other.safetensors" in text
    code, _, err = run_cli("generate", "x", "--model", demo_model, "--vae", "nothere", *SMALL)
    assert code != 0 and "nothere: no such VAE file" in err and len(err.strip().splitlines()) == 1


def test_prefixed_and_state_dict_wrapped_files_load(demo_model, vae_files, tmp_path, demo_engine):
    from sdterm.engine.pipeline import Engine, open_model

    own = demo_vae(demo_model)
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in own.items()}, str(prefixed))
    wrapped = tmp_path / "wrapped.ckpt"
    extras = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999),
              "encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}  # ignored: sdterm only decodes
    torch.save({"state_dict": {**{k: v * 0.7 for k, v in own.items()}, **extras}, "global_step": 3}, wrapped)
    cfg = demo_engine.models.cfg.vae
    assert verify_vae_file(prefixed, cfg).prefix == "first_stage_model."
    assert verify_vae_file(wrapped, cfg).prefix == ""
    reference = demo_engine.generate(REQ).image
    engine = Engine(open_model(demo_model), "cpu", vae=prefixed)
    assert np.array_equal(np.asarray(engine.generate(REQ).image), np.asarray(reference))
    engine.set_vae(wrapped)
    result = engine.generate(REQ)
    assert not np.array_equal(np.asarray(result.image), np.asarray(reference))
    assert result.infotext_extra["VAE"] == "wrapped.ckpt"


def test_set_vae_rebuilds_only_the_decoder(demo_model, vae_files):
    from sdterm.engine.pipeline import Engine, open_model

    engine = Engine(open_model(demo_model), "cpu")
    first = engine.generate(REQ)
    text, unet, vae = (engine.models.module(s) for s in ("text", "unet", "vae"))
    engine.set_vae(vae_files / "other.safetensors")
    assert engine.models.vae_name == "other.safetensors" and len(engine.models.vae_hash) == 10
    swapped = engine.generate(REQ)
    assert engine.models.module("text") is text and engine.models.module("unet") is unet
    assert engine.models.module("vae") is not vae
    assert not np.array_equal(np.asarray(first.image), np.asarray(swapped.image))
    with pytest.raises(CheckpointError):  # refused: nothing changes
        engine.set_vae(vae_files / "missing.safetensors")
    assert engine.models.vae_name == "other.safetensors"
    engine.set_vae(None)
    back = engine.generate(REQ)
    assert np.array_equal(np.asarray(first.image), np.asarray(back.image))
    assert engine.models.vae_name is None and "VAE" not in back.infotext_extra


def test_the_decoder_a_first_use_built_in_one_pass_goes_when_swapped(demo_model, vae_files, tmp_path, monkeypatch):
    """A first use builds the decoder in one pass over the file (single_pass.py); after ``set_vae``
    nothing holds the old decoder (its host memory is freed), the pass included."""
    import gc
    import shutil
    import weakref

    from sdterm.engine.loading import models as models_mod
    from sdterm.engine.pipeline import Engine, open_model

    from .test_model_cache import published

    monkeypatch.setattr(models_mod, "SINGLE_PASS_BYTES", 0)
    model = shutil.copytree(demo_model, tmp_path / "model")
    engine = Engine(open_model(model), "cpu", model_cache=tmp_path / "models")
    assert engine.models._store.first_pass is not None
    engine.generate(REQ)
    old = weakref.ref(engine.models.module("vae"))
    engine.set_vae(vae_files / "other.safetensors")
    engine.generate(REQ)
    published()
    gc.collect()
    assert old() is None


# --------------------------------------------------------------------------------------------
# Files that are not a usable SD v1 VAE: one line naming the file
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException, path: Path, *words: str) -> str:
    text = str(exc)
    assert "\n" not in text and str(path) in text, text
    for word in words:
        assert word in text, text
    return text


def _bad_files(folder: Path, own: dict[str, torch.Tensor]):
    def sdxl(p):  # an SDXL checkpoint given as --vae (its VAE alone has SD v1's shapes)
        save_file({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
                   **{f"first_stage_model.{k}": v for k, v in own.items()}}, str(p))

    yield "sdxl.safetensors", sdxl, ("SDXL",)
    yield "flux.safetensors", lambda p: save_file(
        {**own, "decoder.conv_in.weight": torch.zeros(own["decoder.conv_in.weight"].shape[0], 16, 3, 3)}, str(p)), ("16",)
    yield "narrow.safetensors", lambda p: save_file(
        {**own, "decoder.conv_out.weight": torch.zeros(3, 7, 3, 3)}, str(p)), ("decoder.conv_out.weight",)
    yield "half.safetensors", lambda p: save_file(
        {k: v for k, v in own.items() if not k.startswith("decoder.up.")}, str(p)), ("missing",)
    yield "diffusers.safetensors", lambda p: save_file(
        {"decoder.up_blocks.0.resnets.0.norm1.weight": torch.zeros(4), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
         "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)}, str(p)), ("diffusers-format",)

    def truncated(p):
        save_file(own, str(p))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    yield "truncated.safetensors", truncated, ("truncated",)
    yield "unet.safetensors", lambda p: save_file({"model.diffusion_model.out.2.weight": torch.zeros(4)}, str(p)), ()


def test_unusable_files_are_refused_in_one_line(demo_model, tmp_path, demo_engine):
    cfg = demo_engine.models.cfg.vae
    for name, write, words in _bad_files(tmp_path, demo_vae(demo_model)):
        path = tmp_path / name
        write(path)
        with pytest.raises(CheckpointError) as info:
            verify_vae_file(path, cfg)
        _one_line(info.value, path, *words)


def test_the_command_line_names_the_file(demo_model, tmp_path, run_cli):
    path = tmp_path / "diffusers.safetensors"
    save_file({"decoder.up_blocks.0.resnets.0.norm1.weight": torch.zeros(4)}, str(path))
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--vae", path, *SMALL)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(path) in err and "diffusers-format VAE" in err


class _Gadget:
    """Unpickling this calls os.mkdir(marker): a visible side effect if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(demo_model, tmp_path, demo_engine):
    import pickle

    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Gadget(tmp_path / "LIVE")))  # control: plain pickle runs it
    assert (tmp_path / "LIVE").exists()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**demo_vae(demo_model), "payload": _Gadget(marker)}}, path)
    with pytest.raises(CheckpointError) as info:
        verify_vae_file(path, demo_engine.models.cfg.vae)
    _one_line(info.value, path, "refused")
    assert not marker.exists()
