"""The hires fix outside the engine (issue 16): its flags, its infotext (written as A1111 writes it and
read back, A1111's own included), ``sdterm show``, the /hires command, the parameter line and the history."""

from __future__ import annotations

import argparse
import json
import random
import shlex

import pytest
from PIL import Image

from sdterm.commands import CommandError, parse_command
from sdterm.history import History, HistoryEntry
from sdterm.options import add_render_options, params_from_args
from sdterm.params import HIRES_UPSCALERS, Params
from sdterm.pngmeta import infotext, params_from_infotext, params_from_sdterm_json, png_bytes, read_png_parameters
from sdterm.session import Session
from sdterm.show import generate_command, notes
from sdterm.show import run as show_run

# An A1111 v1.10 hires-fix render's parameters text: Size is the first pass's, Denoising strength the hires pass's.
A1111_HIRES = ("a castle\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
               "Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, "
               "Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent (bicubic), Version: v1.10.1")


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_render_options(p)
    p.add_argument("words", nargs="*")
    return p.parse_args(list(argv))


# ---- flags ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, scale", [("2", 2.0), ("2x", 2.0), ("1.5", 1.5), ("1.5X", 1.5), ("3×", 3.0)])
def test_hires_scale_flag(given, scale):
    p = params_from_args(_parse("--hires-scale", given)).validated()
    assert p.hires_scale == scale and p.hires


@pytest.mark.parametrize("given, size", [("1024x1536", (1024, 1536)), ("1024x0", (1024, 0)), ("0x1536", (0, 1536))])
def test_hires_size_flag(given, size):
    p = params_from_args(_parse("--hires-size", given)).validated()
    assert (p.hires_width, p.hires_height) == size and p.hires_scale == 0 and p.hires


@pytest.mark.parametrize("argv, message", [
    (("--hires-size", "0x0"), "hires size 0x0 gives no size"),
    (("--hires-size", "big"), "hires size must be WIDTHxHEIGHT"),
    (("--hires-scale", "two"), "expected a scale such as 2, 2x or 1.5"),
    (("--hires-upscaler", "R-ESRGAN 4x+"), "unknown hires upscaler 'R-ESRGAN 4x+'; one of: " + ", ".join(HIRES_UPSCALERS)),
])
def test_bad_hires_flags_are_one_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last


def test_hires_steps_strength_and_upscaler_flags():
    p = params_from_args(_parse("--hires-scale", "2", "--hires-steps", "10", "--hires-strength", "0.5",
                                "--hires-upscaler", "latent (BICUBIC)")).validated()
    assert (p.hires_steps, p.hires_strength, p.hires_upscaler) == (10, 0.5, "Latent (bicubic)")
    assert params_from_args(_parse("--hires-denoising-strength", "0.3")).hires_strength == 0.3
    assert params_from_args(_parse("--hires-upscaler", "lanczos")).hires_upscaler == "Lanczos"
    assert params_from_args(_parse()) == Params()  # off by default


# ---- infotext written ---------------------------------------------------------------------------------

def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(pair.split(": ", 1)) for pair in text.splitlines()[-1].split(", ")]


def test_infotext_is_a1111s_for_a_scale():
    p = Params("a castle", seed=3, steps=20, width=512, height=768, clip_skip=2, hires_scale=2.0, hires_steps=10,
               hires_strength=0.45, hires_upscaler="Latent (bicubic)")
    text = infotext(p, "m", "h", {"TI hashes": "x: 0123456789ab"})
    pairs = _pairs(text.replace('"x: 0123456789ab"', "x"))
    keys = [k for k, _ in pairs]
    assert dict(pairs)["Size"] == "512x768"  # the first pass's size
    assert dict(pairs)["Denoising strength"] == "0.45"
    assert keys.index("Model") < keys.index("Denoising strength") < keys.index("RNG")  # img2img's slot
    assert keys[-4:] == ["Hires upscale", "Hires steps", "Hires upscaler", "TI hashes"]  # extras, before the engine's
    assert keys.index("Clip skip") < keys.index("Hires upscale")
    assert (dict(pairs)["Hires upscale"], dict(pairs)["Hires steps"], dict(pairs)["Hires upscaler"]) == \
        ("2", "10", "Latent (bicubic)")


def test_infotext_scale_size_and_steps_forms():
    assert "Hires upscale: 1.5, Hires upscaler: Latent" in infotext(Params("x", hires_scale=1.5), "m", "h")
    text = infotext(Params("x", hires_width=1024, hires_height=0, hires_upscaler="Lanczos"), "m", "h")
    assert "Hires resize: 1024x0, Hires upscaler: Lanczos" in text and "Hires upscale:" not in text
    assert "Hires steps" not in text  # 0: as many as the first pass, not written
    assert "Denoising strength: 0.7" in text  # the default hires strength is written too
    plain = infotext(Params("x"), "m", "h")
    assert "Hires" not in plain and "Denoising strength" not in plain


# ---- infotext read ---------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [
    Params("a castle", seed=3, steps=20, width=512, height=768, hires_scale=2.0, hires_steps=10, hires_strength=0.45,
           hires_upscaler="Latent (bicubic)"),
    Params("x", seed=1, hires_scale=1.5),
    Params("x", seed=1, hires_width=1024, hires_height=1536, hires_upscaler="Nearest", hires_strength=0.3),
    Params("x", seed=1, width=640, hires_width=0, hires_height=1024, hires_upscaler="None", hires_steps=4),
])
def test_infotext_round_trip(p):
    assert params_from_infotext(infotext(p, "m", "h")).params == p
    found = params_from_sdterm_json(json.dumps({"request": p.to_dict(), "model": "m", "model_hash": "h"}))
    assert found.params == p


def test_png_round_trip_through_both_texts(tmp_path):
    p = Params("a castle", seed=3, hires_scale=2.0, hires_steps=10, hires_upscaler="Lanczos")
    path = tmp_path / "o.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), p, "m", "h"))
    assert read_png_parameters(path).params == p
    with Image.open(path) as im:
        assert params_from_infotext(im.info["parameters"]).params == p


def test_an_a1111_hires_text_reads_into_the_hires_fields():
    found = params_from_infotext(A1111_HIRES)
    p = found.params
    assert (p.hires_scale, p.hires_steps, p.hires_strength, p.hires_upscaler) == (2.0, 10, 0.45, "Latent (bicubic)")
    assert (p.width, p.height, p.steps, p.clip_skip) == (512, 768, 20, 2)
    assert found.get("strength") is None and p.strength == 0.75  # the hires pass's strength, not img2img's
    assert not any(k.startswith("Hires") or k == "Denoising strength" for k in found.extra)
    assert p.validated() and not any("hires" in n.lower() for n in notes(found))


def test_hires_upscale_reads_2_and_2_point_0_and_resize_with_zeros():
    assert params_from_infotext(A1111_HIRES.replace("Hires upscale: 2,", "Hires upscale: 2.0,")).params.hires_scale == 2.0
    p = params_from_infotext(A1111_HIRES.replace("Hires upscale: 2,", "Hires resize: 0x1536,")).params
    assert (p.hires_scale, p.hires_width, p.hires_height) == (0.0, 0, 1536)


@pytest.mark.parametrize("name", ["R-ESRGAN 4x+", "4x-UltraSharp", "ESRGAN_4x", "SwinIR 4x"])
def test_an_upscaler_sdterm_lacks_reads_as_lanczos_with_a_note(name):
    found = params_from_infotext(A1111_HIRES.replace("Latent (bicubic)", name))
    assert found.params.hires_upscaler == "Lanczos" and found.params.validated()
    said = [n for n in notes(found) if "upscaler" in n]
    assert said == [f"hires upscaler {name}: sdterm has only the built-in ones (no ESRGAN); Lanczos is used"]
    assert "--hires-upscaler Lanczos" in generate_command(found)


def test_hires_keys_sdterm_cant_run_are_noted():
    text = A1111_HIRES.replace("Version:", 'Hires sampler: Euler a, Hires prompt: "a castle, detailed", '
                                           "Hires schedule type: Exponential, Hires CFG Scale: 5, Version:")
    found = params_from_infotext(text)
    said = notes(found)
    for key, main in (("Hires sampler", "sampler"), ("Hires prompt", "prompt"), ("Hires schedule type", "schedule"),
                      ("Hires CFG Scale", "CFG scale")):
        assert sum(n.startswith(key + " ") and n.endswith(f": not supported; the hires pass uses the main {main}")
                   for n in said) == 1, key
    assert found.params.hires_scale == 2.0  # the rest of the hires fix is still read


def test_an_unreadable_hires_fix_is_noted_not_read():
    found = params_from_infotext(A1111_HIRES.replace("Hires upscale: 2,", "Hires upscale: lots,"))
    assert not found.params.hires and found.get("strength") is None
    assert any("hires fix settings that can't be read" in n for n in notes(found))


# ---- sdterm show ---------------------------------------------------------------------------------------

def test_show_line_carries_the_hires_flags_and_parses_back():
    found = params_from_infotext(A1111_HIRES)
    line = generate_command(found)
    assert "--hires-scale 2 --hires-steps 10 --hires-strength 0.45 --hires-upscaler 'Latent (bicubic)'" in line
    words = shlex.split(line)[2:]
    args = _parse(*words)
    again = params_from_args(args).replace(prompt=" ".join(args.words))
    assert again == found.params.replace(schedule=again.schedule)  # DPM++ 2M's Karras: its own default
    size = generate_command(params_from_infotext(A1111_HIRES.replace("Hires upscale: 2,", "Hires resize: 1024x0,")))
    assert "--hires-size 1024x0" in size and "--hires-scale" not in size
    assert "--hires" not in generate_command(params_from_infotext(A1111_HIRES.split(", Hires upscale")[0]))


def test_show_prints_a_hires_row(tmp_path, capsys):
    p = Params("a castle", seed=3, width=512, height=768, hires_scale=2.0, hires_steps=10)
    path = tmp_path / "o.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), p, "m", "h"))
    assert show_run(argparse.Namespace(image=str(path), json=False)) == 0
    out = capsys.readouterr().out
    assert "hires      2x Latent, 10 steps, strength 0.7 → 1024x1536" in out
    assert "--hires-scale 2 --hires-steps 10 --hires-strength 0.7 --hires-upscaler Latent" in out
    sized = tmp_path / "s.png"
    sized.write_bytes(png_bytes(Image.new("RGB", (8, 8)), p.replace(hires_scale=0.0, hires_width=1024, hires_steps=0),
                                "m", "h"))
    show_run(argparse.Namespace(image=str(sized), json=False))
    assert "to 1024x0 Latent, steps as the first pass, strength 0.7 → 1024x1536" in capsys.readouterr().out


# ---- the session and /hires ----------------------------------------------------------------------------

def _session(tmp_path) -> Session:
    return Session(Params(width=512, height=768), History(tmp_path / "history.jsonl"), random.Random(0))


def test_hires_command(tmp_path):
    s = _session(tmp_path)
    assert s.apply(parse_command("/hires")).message.startswith("hires fix off; /hires 2x")
    assert s.apply(parse_command("/hires 2x")).message == \
        "hires 2x→1024x1536 Latent 0.70: renders 512x768, then upscales and refines"
    assert "hires 2x→1024x1536 Latent 0.70" in s.describe()
    s.apply(parse_command("/hires 1.5 steps=10 strength=0.5 upscaler=latent (nearest-exact)"))
    p = s.params
    assert (p.hires_scale, p.hires_steps, p.hires_strength, p.hires_upscaler) == (1.5, 10, 0.5, "Latent (nearest-exact)")
    assert "hires 1.5x→768x1152 Latent (nearest-exact) 10 steps 0.50" in s.describe()
    s.apply(parse_command("/hires 1024x0 upscaler=Latent (bicubic) steps=10"))
    assert (s.params.hires_upscaler, s.params.hires_steps) == ("Latent (bicubic)", 10)  # a name with blanks, then more
    assert (s.params.hires_scale, s.params.hires_width, s.params.hires_height) == (0.0, 1024, 0)
    assert s.params.hires_steps == 10  # kept: only what is named changes
    assert "hires 1024x0→1024x1536" in s.describe()
    s.apply(parse_command("/hires strength=0.3 upscaler=LANCZOS"))
    assert (s.params.hires_width, s.params.hires_strength, s.params.hires_upscaler) == (1024, 0.3, "Lanczos")
    assert s.apply(parse_command("/hires off")).message == "hires fix off"  # a size set: off all the same
    assert not s.params.hires and "hires" not in s.describe()
    s.apply(parse_command("/hires 640x960"))
    assert s.apply(parse_command("/hires 2")).message.startswith("hires 2x→1024x1536")  # a scale clears the size
    assert (s.params.hires_width, s.params.hires_height) == (0, 0)
    assert s.apply(parse_command("/hires off")).message == "hires fix off"
    assert not s.params.hires


@pytest.mark.parametrize("arg, message", [
    ("big", "/hires takes a scale (2x, 1.5), a size (1024x1536) or off, got 'big'"),
    ("2x speed=3", "/hires: expected steps=N, strength=S or upscaler=NAME, got 'speed=3'"),
    ("2x upscaler=esrgan", "unknown hires upscaler 'esrgan'; one of: Latent,"),
    ("5x", "hires scale must be between 1 and 4, got 5"),
    ("2x strength=0", "hires strength must be above 0"),
    ("2x steps=ten", "hires steps must be a whole number, got 'ten'"),
    ("0x0", "hires size 0x0 gives no size"),
    ("2x steps=3 lanczos", "hires steps must be a whole number, got '3 lanczos'"),
    ("2x lanczos", "/hires: expected steps=N, strength=S or upscaler=NAME, got 'lanczos'"),
])
def test_bad_hires_command_is_one_line_and_changes_nothing(tmp_path, arg, message):
    s = _session(tmp_path)
    before = s.params
    with pytest.raises(CommandError) as err:
        s.apply(parse_command(f"/hires {arg}"))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert s.params == before


def test_hires_and_init_refuse_each_other_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat.png").write_bytes(b"")
    s = _session(tmp_path)
    s.apply(parse_command("/init cat.png"))
    with pytest.raises(CommandError, match="^the hires fix renders text-to-image: /init off first"):
        s.apply(parse_command("/hires 2x"))
    s.apply(parse_command("/init off"))
    s.apply(parse_command("/hires 2x"))
    with pytest.raises(CommandError, match="^img2img with the hires fix on: /hires off first"):
        s.apply(parse_command("/init cat.png"))
    assert s.params.init_image == "" and s.params.hires


# ---- history ----------------------------------------------------------------------------------------

def test_history_round_trips_the_hires_fields(tmp_path):
    p = Params("fox", seed=3, hires_width=1024, hires_height=1536, hires_steps=5, hires_strength=0.4,
               hires_upscaler="Latent (antialiased)")
    h = History(tmp_path / "history.jsonl")
    h.append(HistoryEntry(p, "o.png", "h", "2024-05-01T12:00:00+00:00"))
    assert History(tmp_path / "history.jsonl").entries[-1].params == p


def test_a_history_line_without_the_hires_fields_loads_with_the_hires_fix_off():
    line = ('{"time":"2024-05-01T12:00:00+00:00","prompt":"fox","seed":1,"steps":20,"cfg":7.0,"width":512,'
            '"height":512,"path":null,"model_hash":"h"}')
    p = HistoryEntry.from_json(line).params
    assert not p.hires and (p.hires_strength, p.hires_upscaler, p.hires_steps) == (0.7, "Latent", 0)


def test_a_from_file_line_takes_the_hires_flags(tmp_path):
    from sdterm.cli.generate import _batch_jobs

    lines = tmp_path / "jobs.txt"
    lines.write_text("a castle --hires-size 1024x0 --hires-upscaler lanczos\na fox\n", encoding="utf-8")
    (_, castle), (_, fox) = _batch_jobs(str(lines), _parse("--hires-scale", "2"))
    p = params_from_args(castle)
    assert (p.hires_scale, p.hires_width, p.hires_height, p.hires_upscaler) == (2.0, 1024, 0, "Lanczos")
    assert params_from_args(fox).hires_scale == 2.0 and params_from_args(fox).hires_width == 0
