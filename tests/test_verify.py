"""The reproducibility stamp and ``sdterm verify`` (issue 17, part 2), end to end through the CLI
on the demo model (CPU, 64x64, 3 steps): the stamp round-trips through the PNG; verify passes on a
fresh PNG, fails naming the max diff when pixels were altered, names the stamp fields that differ
from this machine, verifies an A1111 PNG from its text, and answers a PNG without parameters or a
missing model in one line; nothing is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from sdterm import __version__
from sdterm.pngmeta import read_png_parameters
from sdterm.stamp import FIELDS, differences, gather, read_stamp

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--width", "64", "--height", "64", "--steps", "3"]


@pytest.fixture
def fresh(demo_model, tmp_path, run_cli) -> Path:
    """A PNG that ``sdterm generate`` just wrote (seed 5)."""
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 5, "--outdir", tmp_path / "out",
                             "--no-history", *SMALL)
    assert code == 0, err
    return Path(out.strip())


def rewrite(src: Path, dst: Path, *, pixels=None, chunk=None, parameters=True, sdterm=True) -> Path:
    """A copy of ``src`` with other pixels, an edited ``sdterm`` chunk (a function of its JSON), or
    without one of its texts."""
    with Image.open(src) as im:
        im.load()
        texts = dict(im.text)
        array = np.asarray(im.convert("RGB")).copy()
    if pixels is not None:
        pixels(array)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", texts["parameters"])
    if sdterm:
        meta = json.loads(texts["sdterm"])
        if chunk is not None:
            chunk(meta)
        info.add_text("sdterm", json.dumps(meta))
    Image.fromarray(array).save(dst, pnginfo=info)
    return dst


def test_the_stamp_round_trips_through_the_png(fresh, demo_model):
    stamp = read_stamp(fresh)
    assert stamp is not None and sorted(stamp) == sorted(FIELDS)  # the chunk is written with sorted keys
    sha = hashlib.sha256((demo_model / "model.safetensors").read_bytes()).hexdigest()
    assert stamp["model_sha256"] == sha  # the full hash, not only A1111's 10 digits
    assert (stamp["sdterm"], stamp["torch"], stamp["cuda"]) == (__version__, torch.__version__, None)
    assert stamp["device"].startswith("cpu") and stamp["attention"] == "sdpa (cpu)"
    assert [stamp[f"dtype_{m}"] for m in ("unet", "vae", "text")] == ["float32"] * 3
    assert (stamp["sampler"], stamp["schedule"], stamp["rng"], stamp["plan"]) == ("DDIM", "Uniform", "cpu", "cpu")
    assert (stamp["vae"], stamp["loras"], stamp["embeddings"]) == (None, [], [])
    # The request and A1111's text are as before: the stamp is only in sdterm's JSON chunk.
    found = read_png_parameters(fresh)
    assert found.extra == {"demo": "true"} and found.params.seed == 5
    with Image.open(fresh) as im:
        assert "stamp" not in im.text["parameters"] and "torch" not in im.text["parameters"]


def test_an_image_without_a_stamp_reads_as_before(fresh, tmp_path):
    old = rewrite(fresh, tmp_path / "old.png", chunk=lambda meta: meta.pop("stamp"))
    assert read_stamp(old) is None and read_png_parameters(old).params == read_png_parameters(fresh).params


def test_the_stamp_holds_the_addons_full_hashes(tmp_path):
    """LoRAs and embeddings: each file's whole sha256, beside the name the prompt uses."""
    from types import SimpleNamespace

    from sdterm.params import Params

    lora, emb = tmp_path / "detail.safetensors", tmp_path / "foxy.pt"
    lora.write_bytes(b"lora bytes")
    emb.write_bytes(b"embedding bytes")
    result = SimpleNamespace(plan="cpu", model_name="m", stages=[], loras=[{"name": "detail", "file": str(lora)}],
                             prompts={"prompt": {"embeddings": [{"name": "foxy", "file": str(emb)}]}})
    stamp = gather(SimpleNamespace(), Params("x"), result)
    assert stamp["loras"] == [f"detail {hashlib.sha256(b'lora bytes').hexdigest()}"]
    assert stamp["embeddings"] == [f"foxy {hashlib.sha256(b'embedding bytes').hexdigest()}"]


def test_differences_compare_only_what_the_image_recorded():
    image = {"torch": "2.4.0", "sampler": "DDIM", "model": "a"}
    here = {"torch": "2.5.1", "sampler": "DDIM", "model": "b", "device": "cpu"}
    assert differences(image, here) == [("torch version", "2.4.0", "2.5.1")]  # model names don't change pixels


def test_verify_passes_on_a_fresh_png_and_writes_nothing(fresh, demo_model, run_cli):
    before = fresh.read_bytes()
    code, out, err = run_cli("verify", fresh, "--model", demo_model)
    assert code == 0, err
    assert out.splitlines()[0] == "identical: every pixel matches"
    assert "differs" not in out and "likely causes" not in out
    assert fresh.read_bytes() == before and sorted(p.name for p in fresh.parent.iterdir()) == [fresh.name]


def test_verify_finds_the_model_by_its_sha256_in_the_models_folder(fresh, demo_model, run_cli, monkeypatch, tmp_path):
    from sdterm.resolve import models_dir

    models_dir().mkdir(parents=True)
    (models_dir() / "other").mkdir()  # not a model: skipped
    (models_dir() / "renamed").symlink_to(demo_model)  # another name: found by its hash
    code, out, err = run_cli("verify", fresh)
    assert code == 0, err
    assert out.startswith("identical") and "with renamed" in err


def test_verify_fails_and_names_the_max_diff_when_pixels_were_altered(fresh, demo_model, run_cli, tmp_path):
    def alter(a):
        a[10, 20, 1] = (int(a[10, 20, 1]) + 37) % 256
    altered = rewrite(fresh, tmp_path / "altered.png", pixels=alter)
    code, out, err = run_cli("verify", altered, "--model", demo_model)
    assert code == 1
    assert out.splitlines()[0].startswith("different: max diff 37, mean ")
    assert err.strip().splitlines()[-1] == "sdterm: verify: altered.png differs (max diff 37 levels, tolerance 0)"
    # A stated tolerance lets it pass, and says so.
    code, out, err = run_cli("verify", altered, "--model", demo_model, "--tolerance", 40)
    assert code == 0 and out.startswith("within 40 levels: max diff 37")


@pytest.mark.parametrize("key, value, line", [
    ("sampler", "Euler", "  sampler: Euler (image) vs DDIM (here)"),
    ("torch", "1.13.1", f"  torch version: 1.13.1 (image) vs {torch.__version__} (here)"),
])
def test_verify_names_the_stamp_field_that_differs(fresh, demo_model, run_cli, tmp_path, key, value, line):
    edited = rewrite(fresh, tmp_path / "edited.png", chunk=lambda meta: meta["stamp"].update({key: value}))
    code, out, err = run_cli("verify", edited, "--model", demo_model)
    assert code == 0, err  # the request is the same: the pixels still match
    assert out.splitlines()[:3] == ["identical: every pixel matches", "the stamp differs from this machine:", line]
    # With pixels that differ too, the field is the likely cause.
    def alter(a):
        a[:8] = 255 - a[:8]
    both = rewrite(edited, tmp_path / "both.png", pixels=alter)
    code, out, err = run_cli("verify", both, "--model", demo_model)
    assert code == 1 and out.splitlines()[1:3] == ["likely causes:", line]


def test_verify_renders_an_a1111_png_from_its_text_and_says_it_has_no_stamp(fresh, demo_model, run_cli, tmp_path):
    a1111 = rewrite(fresh, tmp_path / "a1111.png", sdterm=False)
    code, out, err = run_cli("verify", a1111, "--model", demo_model)
    assert code == 0, err
    assert out.splitlines()[0] == "identical: every pixel matches"
    assert "no stamp in the image" in out.splitlines()[1]


def test_a_png_without_parameters_is_one_line(fresh, run_cli, tmp_path):
    bare = rewrite(fresh, tmp_path / "bare.png", parameters=False, sdterm=False)
    code, out, err = run_cli("verify", bare)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"sdterm: error: {bare}: no generation parameters (no 'parameters' or "
                                        "'sdterm' text in the image): nothing to verify"]
    code, out, err = run_cli("verify", tmp_path / "nowhere.png")
    assert code == 1 and err.strip().splitlines() == [f"sdterm: error: {tmp_path / 'nowhere.png'}: no such image"]


def test_a_missing_model_is_one_line_naming_its_hash(fresh, run_cli, tmp_path):
    sha = read_stamp(fresh)["model_sha256"]
    code, out, err = run_cli("verify", fresh)  # no models folder, no default model, no sdterm --demo model
    assert code == 1 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"sdterm: error: no model with the image's sha256 {sha[:16]}… (demo) in ")
    assert line.endswith("(there: none): give it with --model PATH")
    # An A1111 image: by its 10-digit hash.
    a1111 = rewrite(fresh, tmp_path / "a1111.png", sdterm=False)
    code, out, err = run_cli("verify", a1111)
    assert code == 1 and f"no model with the image's hash {sha[:10]} (demo) in " in err


def test_sdterm_show_prints_the_stamp_in_one_row(fresh, run_cli):
    code, out, err = run_cli("show", fresh)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if line.startswith("made on")]
    assert f"sdterm {__version__} · torch {torch.__version__} · cpu" in row and "DDIM Uniform · rng cpu · plan cpu" in row
    assert not any(line.startswith("stamp") for line in out.splitlines())
    code, out, err = run_cli("show", fresh, "--json")
    assert json.loads(out)["stamp"] == read_stamp(fresh)
