"""Reading parameters back from images (`sdterm show`): sdterm's PNGs, A1111's text, broken files."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from sdterm.cli import build_parser
from sdterm.errors import UserError
from sdterm.params import MAX_SEED, Params
from sdterm.pngmeta import (
    ImageParameters,
    MetadataError,
    infotext,
    sdterm_chunk,
    params_from_infotext,
    parse_infotext,
    png_bytes,
    read_png_parameters,
)
from sdterm.show import add_parser, generate_command, notes
from sdterm.show import run as cmd_show

A1111_TEXT = (
    "a cat, (masterpiece:1.2)\n"
    "Negative prompt: ugly, blurry\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abcdef1234, '
    'Model: v1-5-pruned-emaonly, Lora hashes: "x: 1, y: 2", Version: v1.6.0'
)

REQUEST = Params(
    prompt="a red fox, (sunset:1.1)\nin the snow",
    negative="blurry, low quality",
    seed=3_000_000_001,
    steps=37,
    cfg=6.5,
    width=64,
    height=40,
    eta=0.35,
    subseed=77,
    subseed_strength=0.25,
)

TYPED = ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "eta", "subseed", "subseed_strength")


def small_image() -> Image.Image:
    return Image.new("RGB", (8, 8), (200, 30, 40))


def write_png(path: Path, **chunks: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    small_image().save(path, format="PNG", pnginfo=info)
    return path


def sdterm_png(path: Path, req: Params = REQUEST, **extra) -> Path:
    path.write_bytes(png_bytes(small_image(), req, "v1-5-pruned-emaonly", "6ce0161689", extra or {"demo": False}))
    return path


def show_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sdterm")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["show", *argv])


def parse_generate(line: str) -> argparse.Namespace:
    argv = shlex.split(line)
    assert argv[:2] == ["sdterm", "generate"]
    return build_parser().parse_args(argv[1:])


# --------------------------------------------------------------------------------------------
# sdterm's own PNGs
# --------------------------------------------------------------------------------------------


def test_sdterm_png_reads_back_the_exact_request(tmp_path):
    p = read_png_parameters(sdterm_png(tmp_path / "a.png"))
    assert p.source == "sdterm"
    assert {k: p.get(k) for k in TYPED} == {k: getattr(REQUEST, k) for k in TYPED}
    assert (p.sampler, p.model, p.model_hash) == ("DDIM", "v1-5-pruned-emaonly", "6ce0161689")
    assert p.extra == {"demo": "false"}
    assert p.params == REQUEST
    assert notes(p) == []


def test_sdterm_parameters_text_alone_reads_back_the_same(tmp_path):
    """Without the JSON chunk, the A1111 text sdterm writes carries the same values."""
    text = infotext(REQUEST, "v1-5-pruned-emaonly", "6ce0161689")
    p = read_png_parameters(write_png(tmp_path / "a.png", parameters=text))
    assert p.source == "a1111"
    assert {k: p.get(k) for k in TYPED} == {k: getattr(REQUEST, k) for k in TYPED}
    assert (p.sampler, p.model, p.model_hash, p.extra) == ("DDIM", "v1-5-pruned-emaonly", "6ce0161689", {})


def test_demo_images_say_so(tmp_path):
    p = read_png_parameters(sdterm_png(tmp_path / "a.png", demo=True))
    assert any("demo model" in n for n in notes(p))


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111's text
# --------------------------------------------------------------------------------------------


def test_a1111_png(tmp_path):
    p = read_png_parameters(write_png(tmp_path / "a.png", parameters=A1111_TEXT))
    assert p.source == "a1111"
    assert p.params.prompt == "a cat, (masterpiece:1.2)"
    assert p.params.negative == "ugly, blurry"
    assert (p.get("steps"), p.get("cfg"), p.get("seed"), p.get("width"), p.get("height")) == (20, 7.0, 1234, 512, 768)
    assert (p.sampler, p.model, p.model_hash) == ("Euler a", "v1-5-pruned-emaonly", "abcdef1234")
    assert (p.get("eta"), p.get("subseed"), p.get("subseed_strength")) == (None, None, None)
    assert p.extra == {"Version": "v1.6.0"} and p.loras == {"x": "1", "y": "2"}
    assert (p.get("sampler"), p.get("schedule"), p.get("rng")) == ("Euler a", "Automatic", "nv")  # no RNG: A1111's GPU
    found = notes(p)
    assert not any("sampler" in n or "RNG" in n for n in found)  # sdterm renders Euler a, and A1111's GPU noise
    assert any("attention syntax" in n for n in found)
    assert not any("not used by sdterm" in n for n in found)  # Version changes nothing; LoRA has its own note


def test_parse_infotext_settings_and_typed_fields():
    d = parse_infotext(A1111_TEXT)
    assert d["settings"] == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1234", "Size": "512x768",
        "Model hash": "abcdef1234", "Model": "v1-5-pruned-emaonly", "Lora hashes": "x: 1, y: 2", "Version": "v1.6.0",
    }
    assert (d["steps"], d["cfg"], d["seed"], d["width"], d["height"]) == (20, 7.0, 1234, 512, 768)


def test_multi_line_prompt_and_negative():
    text = (
        "a castle on a hill,\n  golden hour\n\nhighly detailed\n"
        "Negative prompt: blurry,\nwatermark\n"
        "Steps: 30, Sampler: DDIM, CFG scale: 5.5, Seed: 9, Size: 640x512, Eta DDIM: 0.2, "
        "Variation seed: 11, Variation seed strength: 0.3, Clip skip: 2, "
        'Hires upscale: 2, Hires upscaler: Latent, Denoising strength: 0.7, ADetailer model: "face_yolov8n.pt"'
    )
    p = params_from_infotext(text)
    assert p.params.prompt == "a castle on a hill,\n  golden hour\n\nhighly detailed"
    assert p.params.negative == "blurry,\nwatermark"
    assert (p.get("steps"), p.get("cfg"), p.get("seed"), p.get("width"), p.get("height")) == (30, 5.5, 9, 640, 512)
    assert (p.get("eta"), p.get("subseed"), p.get("subseed_strength")) == (0.2, 11, 0.3)
    assert p.extra["ADetailer model"] == "face_yolov8n.pt"
    found = notes(p)
    assert p.params.clip_skip == 2 and not any("Clip skip" in n for n in found)  # read, and rendered
    assert (p.params.hires_scale, p.params.hires_upscaler, p.params.hires_strength) == (2.0, "Latent", 0.7)  # read
    assert not any("hires" in n.lower() for n in found)
    assert "not used by sdterm: ADetailer model" in found
    assert not any(n.startswith("sampler") for n in found)


def test_a1111_details():
    # Eta for ancestral samplers, quoted values with escapes, a comma inside an unquoted value,
    # a settings line of fewer than three pairs (then it is prompt text, as in A1111).
    p = params_from_infotext('x\nSteps: 4, Seed: 5, Sampler: Euler a, Eta: 0.5, Note: "say \\"hi\\", ok"')
    assert (p.get("eta"), p.get("eta_ancestral"), p.extra) == (None, 0.5, {"Note": 'say "hi", ok'})
    p = params_from_infotext("x\nSteps: 4, Seed: 5, Model: my model, v2, Size: 8x8")
    assert (p.model, p.get("width")) == ("my model, v2", 8)
    p = params_from_infotext("a cat\nSteps: 20, Seed: 5")
    assert (p.params.prompt, p.get("steps"), p.get("seed")) == ("a cat\nSteps: 20, Seed: 5", None, None)
    p = params_from_infotext("just a prompt")
    assert (p.params.prompt, p.get("steps"), p.extra) == ("just a prompt", None, {})
    # Values of the wrong type stay as text in extra and leave the field None.
    p = params_from_infotext("x\nSteps: many, Seed: -, CFG scale: nan, Size: big")
    assert (p.get("steps"), p.get("seed"), p.get("cfg"), p.get("width")) == (None, None, None, None)
    assert p.extra == {"Steps": "many", "Seed": "-", "CFG scale": "nan", "Size": "big"}


def test_ti_hashes_are_written_as_a1111_does_and_read_as_a_known_field(tmp_path):
    ti = {"TI hashes": "easynegative: c74b4e810b03, foxy: 0123456789ab"}
    text = infotext(REQUEST.replace(clip_skip=2), "v1-5-pruned-emaonly", "6ce0161689", ti)
    settings = text.splitlines()[-1]
    # after the fixed fields (Clip skip, RNG...), quoted because the value holds ':' and ','
    assert settings.endswith(', Clip skip: 2, TI hashes: "easynegative: c74b4e810b03, foxy: 0123456789ab"')
    want = {"easynegative": "c74b4e810b03", "foxy": "0123456789ab"}
    own = tmp_path / "b.png"  # sdterm's PNG: read from its JSON chunk
    own.write_bytes(png_bytes(small_image(), REQUEST, "m", "6ce0161689", {"demo": False}, ti))
    for path in (write_png(tmp_path / "a.png", parameters=text), own):
        p = read_png_parameters(path)
        assert p.embeddings == want and "TI hashes" not in p.extra
        assert p.to_dict()["embeddings"] == want
        assert not any("not used by sdterm" in n or "not supported" in n or "TI" in n for n in notes(p))
    assert infotext(REQUEST, "m", "h", {}) == infotext(REQUEST, "m", "h")
    # A1111's own order: TI hashes among the extras, Version after them
    p = params_from_infotext('x\nSteps: 20, Sampler: Euler a, Seed: 1, TI hashes: "a: 0123456789ab", Version: v1.9.0')
    assert p.embeddings == {"a": "0123456789ab"} and p.extra == {"Version": "v1.9.0"}


@pytest.mark.parametrize(("value", "want"), [
    ("foxy: 0123456789ab", {"foxy": "0123456789ab"}),
    ("a: 1, b: 2, a: 3", {"a": "1", "b": "2"}),  # each name once: the first
    ("a:1,,  b : 2 ,c", {"a": "1", "b": "2"}),
    ("nonsense", {}),
])
def test_parse_ti_hashes(value, want):
    from sdterm.pngmeta import parse_ti_hashes

    assert parse_ti_hashes(value) == want


def test_unreadable_ti_hashes_stay_in_extra_with_a_note():
    p = params_from_infotext('x\nSteps: 20, Sampler: Euler a, Seed: 1, TI hashes: "???"')
    assert p.embeddings == {} and p.extra == {"TI hashes": "???"}
    assert any(n.startswith("TI hashes '???': not name: hash pairs") for n in notes(p))


@pytest.mark.parametrize("text", ["", "   ", "\n\n", " \t\r\n "])
def test_empty_text_is_a_metadata_error(text):
    with pytest.raises(MetadataError):
        parse_infotext(text)


def test_a1111_jpeg_exif_user_comment(tmp_path):
    exif = Image.Exif()
    exif[0x8769] = {0x9286: b"UNICODE\0" + A1111_TEXT.encode("utf-16-be")}
    path = tmp_path / "a.jpg"
    small_image().save(path, format="JPEG", exif=exif)
    p = read_png_parameters(path)
    assert (p.params.prompt, p.params.negative, p.get("seed")) == ("a cat, (masterpiece:1.2)", "ugly, blurry", 1234)
    assert p.loras == {"x": "1", "y": "2"}


# --------------------------------------------------------------------------------------------
# Broken and foreign files
# --------------------------------------------------------------------------------------------


def one_line_error(path: Path) -> str:
    with pytest.raises(MetadataError) as info:
        read_png_parameters(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


@pytest.mark.parametrize(
    "payload",
    [
        "{not json",
        "[" * 100_000,
        json.dumps([1, 2]),
        json.dumps({"request": "a cat"}),
        json.dumps({"request": {"prompt": "a cat"}}),
        json.dumps({"request": {**REQUEST.__dict__, "seed": "12"}}),
        json.dumps({"request": {**REQUEST.__dict__, "steps": True}}),
        json.dumps({"request": {**REQUEST.__dict__, "cfg": float("nan")}}),
        json.dumps({"request": {**REQUEST.__dict__, "width": 63}}),
        json.dumps({"request": {**REQUEST.__dict__, "prompt": ["a"]}}),
        json.dumps({"request": REQUEST.__dict__, "model": 5}),
    ],
)
def test_invalid_sdterm_chunk_falls_back_to_parameters_or_errors(tmp_path, payload):
    p = read_png_parameters(write_png(tmp_path / "both.png", sdterm=payload, parameters=A1111_TEXT))
    assert p.source == "a1111" and p.get("seed") == 1234
    msg = one_line_error(write_png(tmp_path / "only.png", sdterm=payload))
    assert "sdterm chunk" in msg and "no parameters text" in msg


def test_sdterm_chunk_from_before_variation_seeds(tmp_path):
    old = {k: v for k, v in REQUEST.__dict__.items() if k not in ("subseed", "subseed_strength")}
    p = read_png_parameters(write_png(tmp_path / "a.png", sdterm=json.dumps({"request": old, "model": "m"})))
    assert (p.source, p.get("subseed"), p.get("subseed_strength"), p.model_hash) == ("sdterm", 0, 0.0, None)


def test_missing_file_not_an_image_and_no_parameters(tmp_path):
    assert "no such file" in one_line_error(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("hello\n")
    assert "not" in one_line_error(tmp_path / "notes.png")
    (tmp_path / "empty.png").write_bytes(b"")
    one_line_error(tmp_path / "empty.png")
    good = sdterm_png(tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[:40])
    one_line_error(tmp_path / "cut.png")
    assert "folder" in one_line_error(tmp_path)
    small_image().save(tmp_path / "plain.png")
    assert "no generation parameters" in one_line_error(tmp_path / "plain.png")
    write_png(tmp_path / "blank.png", parameters="  \n ")
    assert "no generation parameters" in one_line_error(tmp_path / "blank.png")
    with pytest.raises(MetadataError) as info:
        read_png_parameters(tmp_path / "line\nbreak.png")
    assert "line\\nbreak.png: no such file" in str(info.value)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300), cut=st.integers(0, 400))
def test_random_bytes_only_ever_raise_metadata_error(tmp_path, data, cut):
    good = sdterm_png(tmp_path / "good.png").read_bytes()
    for blob in (data, good[:cut] + data, b"\x89PNG\r\n\x1a\n" + data):
        path = tmp_path / "fuzz.png"
        path.write_bytes(blob)
        try:
            read_png_parameters(path)
        except MetadataError as exc:
            assert "\n" not in str(exc)


# --------------------------------------------------------------------------------------------
# The generate line
# --------------------------------------------------------------------------------------------


def test_generate_line_parses_back_to_the_same_values(tmp_path):
    p = read_png_parameters(sdterm_png(tmp_path / "a.png"))
    line = generate_command(p, model="/models/my model.safetensors")
    assert line.startswith(
        "sdterm generate 'a red fox, (sunset:1.1)\nin the snow' --model '/models/my model.safetensors'"
    )
    args = parse_generate(line)
    assert args.command == "generate" and args.model == "/models/my model.safetensors"
    assert {k: getattr(args, k) for k in TYPED if k != "subseed_strength"} == {
        k: getattr(REQUEST, k) for k in TYPED if k != "subseed_strength"
    }
    assert args.subseed_strength == REQUEST.subseed_strength


def test_generate_line_leaves_out_defaults_and_unknowns():
    p = ImageParameters(source="a1111", params=Params("-a dash first", "-neg", seed=5, eta=0.0, subseed=3),
                        recorded=frozenset({"prompt", "negative", "seed", "eta", "subseed", "subseed_strength"}))
    line = generate_command(p)
    assert "--eta" not in line and "--subseed" not in line and "--model" not in line and "--steps" not in line
    args = parse_generate(line)
    assert (args.prompt, args.negative, args.seed, args.model) == ("-a dash first", "-neg", 5, None)


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "-", "--", "-x", "--seed", " -x", "'", '"', "a b", "$HOME", "`x`", "\n", "a=b", "-1"]
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    prompt=texts,
    negative=texts,
    model=texts,
    seed=st.integers(0, MAX_SEED),
    steps=st.integers(1, 1000),
    cfg=st.floats(0, 50),
    eta=st.floats(0, 1),
    subseed=st.integers(0, MAX_SEED),
    strength=st.floats(0, 1),
    side=st.integers(1, 512).map(lambda n: n * 8),
)
def test_generate_line_round_trips_through_the_parser(
    prompt, negative, model, seed, steps, cfg, eta, subseed, strength, side
):
    # argparse before 3.13 drops a "--" that is an option's whole value (--negative=--), so a
    # negative prompt or a model path of exactly "--" can't be passed on any command line.
    assume(negative != "--" and model != "--")
    p = ImageParameters(source="sdterm", params=Params(prompt, negative, seed, steps, cfg, side, side + 8, eta, subseed,
                                                       strength))
    args = parse_generate(generate_command(p, model=model))
    assert (args.prompt, args.negative, args.model) == (prompt, negative, model)
    assert (args.seed, args.steps, args.cfg, args.width, args.height) == (seed, steps, cfg, side, side + 8)
    assert args.eta == eta
    assert (args.subseed, args.subseed_strength) == ((subseed, strength) if strength else (0, 0.0))


# --------------------------------------------------------------------------------------------
# Fuzzing the infotext parser
# --------------------------------------------------------------------------------------------

# Pieces that stress the format: separators, quotes, escapes, keys, the negative marker, line ends.
TRICKY = [",", ", ", ":", ": ", '"', "\\", '\\"', "\n", "\r", "\r\n", " ", "\t", "x", "é", "\x00", "\x1b[31m",
          "\u2028", "\x85", "Steps: 20", "Seed: 1, Size: 8x8, CFG scale: 7", "Negative prompt:", "Negative prompt: ",
          '"a, b"', 'K: "unclosed', "Size: 512x", "Model: x", "Lora hashes: \"a: 1, b: 2\"", "(word:1.2)", "1e999"]
tricky_text = st.lists(st.text(max_size=6) | st.sampled_from(TRICKY), max_size=30).map("".join)


@settings(max_examples=400, deadline=None, database=None)
@given(text=st.text() | tricky_text)
def test_parse_infotext_only_raises_metadata_error(text):
    try:
        d = parse_infotext(text)
    except MetadataError:
        return
    assert isinstance(d["prompt"], str) and isinstance(d["negative"], str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in d["settings"].items())
    for name in ("steps", "seed", "width", "height", "subseed"):
        assert d[name] is None or type(d[name]) is int
    for name in ("cfg", "eta", "subseed_strength"):
        assert d[name] is None or type(d[name]) is float
    p = params_from_infotext(text)
    notes(p)
    generate_command(p, model="m")


# Adversarial inputs for the infotext parser, as text of about n units (each family stresses one
# path: quote scanning, escapes, segments without a key, values continued over commas...).
ADVERSARIAL = {
    "escaped quotes": lambda n: 'K: "' + 'a\\"' * n,
    "escaped quote then comma": lambda n: 'K: "a\\", ' * n,
    "quote then comma": lambda n: 'K: "a,' * n,
    "blanks": lambda n: "a" + " " * n,
    "empty segments": lambda n: ", " * n,
    "keys without values": lambda n: "x: " * n,
    "quotes": lambda n: '"' * n,
    "pairs": lambda n: "Steps: 1, " * n,
    "value continued over commas": lambda n: "Model: v" + ", ........" * n,
    "negative lines": lambda n: "Negative prompt: a\n" * n + "Steps: 1, Seed: 2, Size: 8x8",
    "long key": lambda n: "w" * n + ": 1, a: 2, b: 3",
}


def python_steps(text: str) -> int:
    """Lines of sdterm/pngmeta.py executed while parsing ``text``: a clock-free, deterministic count
    of the parser's Python-level work."""
    import sdterm.pngmeta as module

    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename == module.__file__ else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        try:
            parse_infotext(text)
        except MetadataError:
            pass
    finally:
        sys.settrace(previous)
    return count


@pytest.mark.parametrize("family", sorted(ADVERSARIAL))
def test_parse_infotext_work_grows_linearly(family):
    """Four times the input, at most about four times the work (a quadratic scan would be 16x)."""
    make = ADVERSARIAL[family]
    small, large = python_steps(make(2_000)), python_steps(make(8_000))
    assert large <= 4.2 * small + 100, (family, small, large)


HANG_GUARD = 120  # seconds: linear parsing of all of them takes a few; see below


def test_parse_infotext_megabyte_inputs_finish():
    """The same families at a megabyte or more each, in a child process (work done in C, a regex's
    backtracking or a string grown by copying, is not counted above). Linear parsing takes seconds
    for all of them; a quadratic or backtracking one takes many minutes, so the child's timeout is
    a hang guard, generous for a slow or busy machine, not a speed threshold."""
    sizes = {"escaped quotes": 300_000, "escaped quote then comma": 100_000, "quote then comma": 200_000,
             "blanks": 1_000_000, "empty segments": 500_000, "keys without values": 300_000,
             "quotes": 1_000_000, "pairs": 100_000, "value continued over commas": 1_000_000,
             "negative lines": 50_000, "long key": 1_000_000}
    assert set(sizes) == set(ADVERSARIAL)
    script = (
        "import sys\n"
        "from tests.test_pngmeta import ADVERSARIAL\n"
        "from sdterm.pngmeta import MetadataError, parse_infotext\n"
        f"for family, n in {sizes!r}.items():\n"
        "    print(family, flush=True)\n"
        "    try:\n"
        "        parse_infotext(ADVERSARIAL[family](n))\n"
        "    except MetadataError:\n"
        "        pass\n"
        "print('finished', flush=True)\n"
    )
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=HANG_GUARD)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"parse_infotext hung (no result after {HANG_GUARD} s); last input begun: {out.splitlines()[-1:]}") from None
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "finished"


def no_negative_marker(prompt: str) -> bool:
    return not any(line.lstrip().startswith("Negative prompt:") for line in prompt.split("\n"))


# Round-trip constraints (what sdterm's infotext() can carry; its JSON chunk carries anything):
#  * prompt: no line of it may start, after blanks, with "Negative prompt:" (that begins the negative);
#  * negative: anything (everything after the marker up to the settings line is the negative);
#  * cfg, eta, variation strength: written with "%g", so exact only with at most 6 significant digits;
#  * eta and the variation seed are written only when non-zero (read back as None otherwise);
#  * model name: one line, no ",", no leading/trailing blanks, not starting with '"' (written unquoted).
model_names = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ._-()[]:+"), max_size=30
).map(str.strip).filter(lambda s: not s.startswith('"'))


@settings(max_examples=300, deadline=None, database=None)
@given(
    prompt=(st.text() | tricky_text).filter(no_negative_marker),
    negative=st.text() | tricky_text,
    seed=st.integers(0, MAX_SEED),
    steps=st.integers(1, 1000),
    cfg=st.integers(0, 5000).map(lambda n: n / 100),
    eta=st.integers(0, 1000).map(lambda n: n / 1000),
    subseed=st.integers(0, MAX_SEED),
    strength=st.integers(0, 1000).map(lambda n: n / 1000),
    width=st.integers(1, 512).map(lambda n: n * 8),
    height=st.integers(1, 512).map(lambda n: n * 8),
    model=model_names,
    model_hash=st.text(st.sampled_from("0123456789abcdef"), max_size=10),
)
def test_infotext_round_trip(
    prompt, negative, seed, steps, cfg, eta, subseed, strength, width, height, model, model_hash
):
    req = Params(prompt, negative, seed, steps, cfg, width, height, eta, subseed, strength).validated()
    d = parse_infotext(infotext(req, model, model_hash))
    assert (d["prompt"], d["negative"]) == (prompt, negative)
    assert (d["seed"], d["steps"], d["cfg"], d["width"], d["height"]) == (seed, steps, cfg, width, height)
    assert (d["sampler"], d["model"], d["model_hash"]) == ("DDIM", model, model_hash)
    assert d["eta"] == (eta or None)
    assert (d["subseed"], d["subseed_strength"]) == ((subseed, strength) if strength else (None, None))


# --------------------------------------------------------------------------------------------
# sdterm show
# --------------------------------------------------------------------------------------------


def test_show_prints_settings_then_the_generate_line(tmp_path, capsys):
    path = write_png(tmp_path / "a.png", parameters=A1111_TEXT)
    assert cmd_show(show_args(str(path), "--model", "/m/sd15.safetensors")) == 0
    out, err = capsys.readouterr()
    lines = out.rstrip("\n").split("\n")
    assert lines[:4] == [
        "source     AUTOMATIC1111 parameters",
        "prompt     a cat, (masterpiece:1.2)",
        "negative   ugly, blurry",
        "seed       1234",
    ]
    assert "LoRAs      x [1], y [2]" in lines and lines[-2] == ""
    assert lines[-1] == (
        "sdterm generate 'a cat, (masterpiece:1.2)' --model /m/sd15.safetensors --negative 'ugly, blurry' "
        "--seed 1234 --steps 20 --cfg 7 --width 512 --height 768 --sampler 'Euler a' --rng nv"
    )
    assert "sampler    Euler a" in lines and "rng        nv" in lines
    assert "sampler" not in err


def test_show_json_is_one_object(tmp_path, capsys):
    path = sdterm_png(tmp_path / "a.png")
    assert cmd_show(show_args(str(path), "--json")) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert out.count("\n") == 1 and err == ""
    assert data["source"] == "sdterm" and data["prompt"] == REQUEST.prompt and data["seed"] == REQUEST.seed
    assert data["command"] == generate_command(read_png_parameters(path))
    assert any("add --model PATH" in n for n in data["notes"])


def test_show_escapes_control_characters(tmp_path, capsys):
    path = write_png(tmp_path / "a.png", parameters="evil \x1b]0;title\x07 cat\nSteps: 1, Seed: 2, Size: 8x8")
    cmd_show(show_args(str(path)))
    out, err = capsys.readouterr()
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;title\\x07" in out
    assert "exact line" in err
    cmd_show(show_args(str(path), "--json"))
    assert "\x1b" not in capsys.readouterr().out


def test_show_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        cmd_show(show_args(str(tmp_path / "nope.png")))


def test_show_through_the_cli(tmp_path, run_cli):
    code, out, err = run_cli("show", sdterm_png(tmp_path / "a.png"), "--json")
    assert code == 0, err
    assert json.loads(out)["seed"] == REQUEST.seed
    code, out, err = run_cli("show", tmp_path / "missing.png")
    assert code == 1 and err.count("\n") == 1 and "missing.png" in err


def test_pngmeta_imports_no_torch_and_no_cli():
    code = "import sys, sdterm.pngmeta; print([m for m in ('torch', 'sdterm.cli', 'textual') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"



A1111_ADDONS = (
    "masterpiece, 1girl <lora:add_detail:0.6>, <lora:lcm-lora-sdv1-5:1>\n"
    "Negative prompt: lowres\n"
    "Steps: 6, Sampler: LCM, Schedule type: Automatic, CFG scale: 1.5, Seed: 42, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: f921fb3f29, VAE: kl-f8-anime2.ckpt, "
    'Lora hashes: "add_detail: 7c6bad76eb54, lcm-lora-sdv1-5: 46a6f1d8fbd1", Version: v1.10.1'
)


def test_a1111_lora_hashes_and_vae_are_read_as_fields(tmp_path):
    p = read_png_parameters(write_png(tmp_path / "a.png", parameters=A1111_ADDONS))
    assert p.loras == {"add_detail": "7c6bad76eb54", "lcm-lora-sdv1-5": "46a6f1d8fbd1"}
    assert (p.vae, p.vae_hash) == ("kl-f8-anime2.ckpt", "f921fb3f29")
    assert p.extra == {"Version": "v1.10.1"} and p.params.prompt.endswith("<lora:lcm-lora-sdv1-5:1>")
    d = p.to_dict()
    assert d["loras"] == p.loras and (d["vae"], d["vae_hash"]) == (p.vae, p.vae_hash)


def test_sdterm_writes_vae_after_model_and_reads_its_own_back(tmp_path):
    extra = {"TI hashes": "foxy: 0123456789ab", "Lora hashes": "detail: 0123456789ab",
             "VAE hash": "f921fb3f29", "VAE": "vae-ft-mse-840000-ema-pruned.safetensors"}
    text = infotext(REQUEST, "demo", "abcdef1234", extra)
    settings = text.splitlines()[-1]
    assert "Model: demo, VAE hash: f921fb3f29, VAE: vae-ft-mse-840000-ema-pruned.safetensors, " in settings
    assert settings.endswith('TI hashes: "foxy: 0123456789ab", Lora hashes: "detail: 0123456789ab"')
    for chunks in ({"parameters": text}, {"parameters": text, "sdterm": sdterm_chunk(REQUEST, "demo", "abcdef1234", extra)}):
        p = read_png_parameters(write_png(tmp_path / "a.png", **chunks))
        assert p.loras == {"detail": "0123456789ab"} and p.embeddings == {"foxy": "0123456789ab"}
        assert (p.vae, p.vae_hash) == ("vae-ft-mse-840000-ema-pruned.safetensors", "f921fb3f29")
        assert p.extra == {}
