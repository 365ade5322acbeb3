"""img2img's parameters (issue 16): the three Params fields, their flags, their infotext, ``sdterm show``,
the /init and /strength commands, the parameter line and the history."""

from __future__ import annotations

import argparse
import io
import json
import random

import pytest
from PIL import Image

from sdterm.commands import CommandError, complete, parse_command
from sdterm.errors import ConfigError
from sdterm.history import History, HistoryEntry
from sdterm.options import add_render_options, params_from_args
from sdterm.params import FIELDS, RESIZE_MODES, Params
from sdterm.pngmeta import infotext, params_from_infotext, png_bytes, read_png_parameters
from sdterm.session import Session
from sdterm.show import generate_command, notes

# An A1111 img2img render's parameters text (v1.10 order: Denoising strength after Model, before RNG).
A1111_IMG2IMG = ("a fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
                 "Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
                 "Denoising strength: 0.6, Version: v1.10.1")


def test_fields_come_last_with_their_defaults():
    i = FIELDS.index("init_image")  # the hires fix's fields follow them
    assert FIELDS[i : i + 3] == ("init_image", "strength", "resize_mode")
    assert (Params().init_image, Params().strength, Params().resize_mode) == ("", 0.75, "just resize")
    assert RESIZE_MODES == ("just resize", "crop and resize", "resize and fill")


def test_the_engine_uses_the_one_tuple_of_resize_modes():
    from sdterm import params
    from sdterm.engine import init_image

    assert init_image.RESIZE_MODES is params.RESIZE_MODES


@pytest.mark.parametrize("changes, message", [
    (dict(strength=1.5), "strength must be between 0 and 1, got 1.5"),
    (dict(strength=-0.1), "strength must be between 0 and 1, got -0.1"),
    (dict(strength=float("nan")), "strength must be a finite number"),
    (dict(resize_mode="fit"), "unknown resize mode 'fit'; one of: just resize, crop and resize, resize and fill"),
    (dict(init_image="a\0.png"), "init image must be a file path without NUL characters"),
    (dict(init_image=3), "init image must be a file path"),
])
def test_validation_says_one_line(changes, message):
    with pytest.raises(ConfigError) as err:
        Params("x").replace(**changes).validated()
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_render_options(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("given, mode", [("0", "just resize"), ("1", "crop and resize"), ("2", "resize and fill"),
                                         ("crop and resize", "crop and resize"), ("Resize-And-Fill", "resize and fill"),
                                         ("just_resize", "just resize")])
def test_resize_mode_flag_takes_names_and_a1111_numbers(given, mode):
    assert params_from_args(_parse("--resize-mode", given)).resize_mode == mode


@pytest.mark.parametrize("bad", ["3", "fit", "-1"])
def test_an_unknown_resize_mode_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit):
        _parse(f"--resize-mode={bad}")
    assert "unknown resize mode" in capsys.readouterr().err


def test_init_image_and_strength_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cat.png").write_bytes(b"")
    p = params_from_args(_parse("--init-image", "~/cat.png", "--strength", "0.6"))
    assert (p.init_image, p.strength) == (str(tmp_path / "cat.png"), 0.6)
    assert params_from_args(_parse("--init-image", "~/cat.png", "--denoising-strength", "0.3")).strength == 0.3
    assert params_from_args(_parse()) == Params()


def test_a_missing_init_image_is_one_line_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^init image .*nope\.png: no such file; check the path$"):
        params_from_args(_parse("--init-image", str(tmp_path / "nope.png")))


def test_generate_says_a_missing_init_image_in_one_line_and_exits_1(tmp_path, capsys):
    from sdterm.cli import main

    code = main(["generate", "fox", "--random-weights", "--init-image", str(tmp_path / "nope.png")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and err.endswith("nope.png: no such file; check the path")


# ---- infotext ---------------------------------------------------------------------------------------

def test_denoising_strength_is_written_where_a1111_writes_it_whenever_an_init_image_is_used():
    p = Params("fox", init_image="/x/cat.png", strength=0.6, rng="cpu", ensd=5, eta=0.5)
    line = infotext(p, "m", "h", {"VAE": "ft-mse.safetensors", "TI hashes": "a: 0123456789ab"}).split("\n")[-1]
    keys = [pair.split(":")[0] for pair in line.split(", ")]
    assert "Denoising strength: 0.6" in line
    assert keys.index("Model") < keys.index("VAE") < keys.index("Denoising strength") < keys.index("ENSD") \
        < keys.index("RNG")
    default = infotext(Params("fox", init_image="/x/cat.png"), "m", "h")
    assert "Denoising strength: 0.75" in default  # the default too: A1111 always writes it for img2img
    assert "Denoising strength" not in infotext(Params("fox", strength=0.6), "m", "h")  # text-to-image
    assert "cat.png" not in line  # the path is not A1111's


def test_infotext_round_trip_reads_the_strength_back():
    p = Params("fox", seed=3, init_image="/x/cat.png", strength=0.35)
    read = params_from_infotext(infotext(p, "m", "h"))
    assert read.params.strength == 0.35 and "strength" in read.recorded and "Denoising strength" not in read.extra


def test_an_a1111_img2img_text_reads_into_strength():
    read = params_from_infotext(A1111_IMG2IMG)
    assert read.params.strength == 0.6 and read.get("strength") == 0.6 and read.get("init_image") is None
    assert (read.params.width, read.params.height, read.params.sampler) == (512, 768, "Euler a")


def test_a_hires_fix_strength_is_not_an_img2img_strength():
    read = params_from_infotext(A1111_IMG2IMG + ", Hires upscale: 2, Hires upscaler: Latent")
    assert read.get("strength") is None and read.get("hires_strength") == 0.6 and "Denoising strength" not in read.extra


def test_sdterm_chunk_carries_every_img2img_field(tmp_path):
    p = Params("fox", seed=3, init_image="/x/a b.png", strength=0.6, resize_mode="crop and resize")
    path = tmp_path / "o.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), p, "m", "h"))
    with Image.open(path) as im:
        assert json.loads(im.info["sdterm"])["request"]["init_image"] == "/x/a b.png"
    found = read_png_parameters(path)
    assert found.source == "sdterm" and found.params == p


# ---- sdterm show ---------------------------------------------------------------------------------------

def test_show_line_names_the_init_image_and_strength(tmp_path):
    p = Params("fox", seed=3, init_image="/x/my cat.png", strength=0.6, resize_mode="crop and resize")
    path = tmp_path / "o.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), p, "m", "h"))
    found = read_png_parameters(path)
    line = generate_command(found)
    assert "--init-image '/x/my cat.png' --strength 0.6" in line and "--resize-mode 'crop and resize'" in line
    assert not any("init image isn't recorded" in n for n in notes(found))
    plain = read_png_parameters(_png(tmp_path, Params("fox", seed=3)))
    assert "--strength" not in generate_command(plain) and "--init-image" not in generate_command(plain)


def _png(tmp_path, p: Params):
    path = tmp_path / "plain.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), p, "m", "h"))
    return path


def test_show_says_an_a1111_img2img_render_lacks_its_init_image():
    found = params_from_infotext(A1111_IMG2IMG)
    assert "--strength 0.6" in generate_command(found) and "--init-image" not in generate_command(found)
    said = [n for n in notes(found) if "img2img" in n]
    assert said == ["an img2img render whose init image isn't recorded: add --init-image PATH to the line"]
    assert not any("hires" in n for n in notes(found))


# ---- the app ----------------------------------------------------------------------------------------

def _session(tmp_path) -> Session:
    return Session(Params(), History(tmp_path / "history.jsonl"), random.Random(0))


def test_init_and_strength_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(b"")
    s = _session(tmp_path)
    assert s.apply(parse_command("/init cat.png")).message == "img2img from cat.png, strength 0.75"
    assert s.params.init_image == str(tmp_path / "cat.png")
    assert s.apply(parse_command("/strength 0.6")).message == "denoising strength 0.60"
    assert "img2img 0.60 from cat.png" in s.describe()
    for bad, message in (("/strength 1.5", "strength must be between 0 and 1, got 1.5"),
                         ("/strength x", "strength must be a finite number, got 'x'"),
                         ("/init nope.png", "init image 'nope.png': no such file; check the path"),
                         ("/init a\0b.png", "init image must be a file path without NUL characters")):
        with pytest.raises(CommandError, match=f"^{message}$"):
            s.apply(parse_command(bad))
    assert (s.params.init_image, s.params.strength) == (str(tmp_path / "cat.png"), 0.6)  # unchanged by errors
    assert s.apply(parse_command("/init off")).message.startswith("init image off")
    assert s.params.init_image == "" and "img2img" not in s.describe()
    assert s.apply(parse_command("/strength 0.3")).message == "denoising strength 0.30 (used with /init)"


def test_init_completes_png_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "00042-1234.png").write_bytes(b"")
    assert complete("/init 000") == "/init 00042-1234.png"


# ---- history ----------------------------------------------------------------------------------------

def test_history_round_trips_the_img2img_fields(tmp_path):
    p = Params("fox", seed=3, init_image="/x/cat.png", strength=0.6, resize_mode="resize and fill")
    h = History(tmp_path / "history.jsonl")
    h.append(HistoryEntry(p, "o.png", "h", "2024-05-01T12:00:00+00:00"))
    assert History(tmp_path / "history.jsonl").entries[-1].params == p


def test_a_history_line_without_the_img2img_fields_loads_with_defaults():
    line = ('{"time":"2024-05-01T12:00:00+00:00","prompt":"fox","seed":1,"steps":20,"cfg":7.0,"width":512,'
            '"height":512,"path":null,"model_hash":"h"}')
    p = HistoryEntry.from_json(line).params
    assert (p.init_image, p.strength, p.resize_mode) == ("", 0.75, "just resize")


def test_png_bytes_is_unchanged_for_text_to_image():
    buf = io.BytesIO(png_bytes(Image.new("RGB", (8, 8)), Params("fox"), "m", "h"))
    with Image.open(buf) as im:
        assert "Denoising strength" not in im.info["parameters"]
