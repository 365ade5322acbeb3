"""The one parameter record: validation, the dict it is stored as, and the records written before it
(history lines and sdterm PNG chunks in the format of the code it replaced)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from sdterm.errors import ConfigError
from sdterm.history import History, HistoryEntry
from sdterm.params import FIELDS, LEGACY_NAMES, MAX_SEED, REQUIRED, Params
from sdterm.pngmeta import infotext, png_bytes, read_png_parameters, sdterm_chunk

# Written by sdterm before the records were one (HistoryEntry.to_json and output.png_bytes of
# commit a9d53e5) for the same render: keep them byte for byte.
OLD_HISTORY_LINE = (
    '{"time":"2024-05-01T12:00:00+00:00","prompt":"a red fox\\nin the snow","negative":"blurry","seed":3000000001,'
    '"steps":30,"cfg":7.0,"width":512,"height":768,"eta":0.25,"variation":0.1,"variation_seed":7,'
    '"path":"outputs/00000-3000000001.png","model_hash":"6ce0161689"}'
)
OLD_SDTERM_CHUNK = (
    '{"demo": false, "model": "v1-5-pruned-emaonly", "model_hash": "6ce0161689", "request": {"cfg": 7.0, "eta": 0.25, '
    '"height": 768, "negative": "blurry", "prompt": "a red fox\\nin the snow", "seed": 3000000001, "steps": 30, '
    '"subseed": 7, "subseed_strength": 0.1, "width": 512}}'
)
OLD_INFOTEXT = (
    "a red fox\nin the snow\nNegative prompt: blurry\nSteps: 30, Sampler: DDIM, CFG scale: 7, Seed: 3000000001, "
    "Variation seed: 7, Variation seed strength: 0.1, Size: 512x768, Model hash: 6ce0161689, "
    "Model: v1-5-pruned-emaonly, Eta DDIM: 0.25"
)
NEW_KEYS = {"sampler": "DDIM", "schedule": "Automatic", "rng": "cpu", "eta_ancestral": 1.0, "ensd": 0,
            "clip_skip": 1, "init_image": "", "strength": 0.75, "resize_mode": "just resize",
            "hires_scale": 0.0, "hires_width": 0, "hires_height": 0, "hires_steps": 0, "hires_strength": 0.7,
            "hires_upscaler": "Latent"}
"""The fields issues 13-16 added, at their defaults: today's images (DDIM, torch's CPU noise, no hires fix)."""
THE_RENDER = Params(prompt="a red fox\nin the snow", negative="blurry", seed=3_000_000_001, steps=30, cfg=7.0,
                    width=512, height=768, eta=0.25, subseed=7, subseed_strength=0.1)


def test_fields_and_defaults():
    assert FIELDS == ("prompt", "negative", "seed", "steps", "cfg", "width", "height", "eta", "subseed",
                      "subseed_strength", *NEW_KEYS)
    assert Params() == Params("", "", 0, 50, 7.5, 512, 512, 0.0, 0, 0.0, *NEW_KEYS.values())
    assert set(REQUIRED) <= set(FIELDS) and set(LEGACY_NAMES) <= set(FIELDS)


def test_params_are_frozen_and_replace_makes_a_copy():
    p = Params("fox")
    with pytest.raises(AttributeError):
        p.seed = 3  # type: ignore[misc]
    assert p.replace(seed=3) == Params("fox", seed=3) and p.seed == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(steps=0), "steps must be between 1 and 1000, got 0"),
        (dict(seed=MAX_SEED + 1), "seed must be between 0 and 4294967295"),
        (dict(seed=True), "seed must be a whole number"),
        (dict(cfg=float("inf")), "cfg must be a finite number"),
        (dict(cfg=10**400), "cfg must be a finite number"),
        (dict(width=70), "width must be a multiple of 8, got 70 (try 64 or 72)"),
        (dict(subseed_strength=1.5), "variation strength must be between 0 and 1"),
        (dict(prompt=None), "prompt and negative prompt must be text"),
    ],
)
def test_validated_names_the_bad_parameter(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Params("x").replace(**changes).validated()


# ---- to_dict / from_dict ------------------------------------------------------------------------

valid_params = st.builds(
    Params,
    prompt=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
    negative=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    seed=st.integers(0, MAX_SEED),
    steps=st.integers(1, 1000),
    cfg=st.floats(0, 50),
    width=st.integers(1, 512).map(lambda n: n * 8),
    height=st.integers(1, 512).map(lambda n: n * 8),
    eta=st.floats(0, 1),
    subseed=st.integers(0, MAX_SEED),
    subseed_strength=st.floats(0, 1),
)


@settings(max_examples=200, deadline=None, database=None)
@given(p=valid_params)
def test_dict_round_trip(p):
    assert Params.from_dict(p.to_dict()) == p
    assert Params.from_dict(json.loads(json.dumps(p.to_dict()))) == p  # through JSON, as stored
    assert list(p.to_dict()) == list(FIELDS)


@settings(max_examples=100, deadline=None, database=None)
@given(p=valid_params, path=st.none() | st.text(max_size=20), model_hash=st.text(max_size=12))
def test_history_line_round_trip(p, path, model_hash):
    e = HistoryEntry(p, path, model_hash, "2024-05-01T12:00:00+00:00")
    line = e.to_json()
    assert "\n" not in line and HistoryEntry.from_json(line) == e


def test_from_dict_ignores_unknown_keys_and_defaults_what_an_older_sdterm_did_not_write():
    data = {"prompt": "fox", "seed": 1, "steps": 2, "cfg": 3, "width": 64, "height": 64, "from_the_future": [1]}
    p = Params.from_dict(data)
    assert p == Params("fox", seed=1, steps=2, cfg=3.0, width=64, height=64)
    assert isinstance(p.cfg, float)


@pytest.mark.parametrize(
    "data, message",
    [
        ("not a dict", "expected an object"),
        ({"prompt": "fox"}, "missing seed"),
        ({**Params().to_dict(), "seed": "1"}, "seed must be a whole number"),
        ({**Params().to_dict(), "cfg": "7"}, "cfg must be a finite number"),
        ({**Params().to_dict(), "cfg": 10**400}, "cfg is out of range"),
        ({**Params().to_dict(), "steps": 0}, "steps must be between"),
    ],
)
def test_from_dict_rejects_with_one_line(data, message):
    with pytest.raises(ConfigError, match=message):
        Params.from_dict(data)


# ---- records written by the code before ---------------------------------------------------------


def test_an_old_history_line_loads(tmp_path):
    e = HistoryEntry.from_json(OLD_HISTORY_LINE)
    assert e == HistoryEntry(THE_RENDER, "outputs/00000-3000000001.png", "6ce0161689", "2024-05-01T12:00:00+00:00")
    path = tmp_path / "history.jsonl"
    path.write_text(OLD_HISTORY_LINE + "\n", encoding="utf-8")
    assert History(path).entries == [e] and History(path).skipped == 0


def test_a_new_history_line_is_the_old_line_and_more():
    """An earlier sdterm reads the new line: every old key is there with the same value."""
    old, new = json.loads(OLD_HISTORY_LINE), json.loads(HistoryEntry.from_json(OLD_HISTORY_LINE).to_json())
    assert {k: new[k] for k in old} == old
    assert set(new) - set(old) == {"subseed", "subseed_strength", *NEW_KEYS}
    assert {k: new[k] for k in NEW_KEYS} == NEW_KEYS
    assert list(new)[:1] == ["time"] and list(new)[-2:] == ["path", "model_hash"]


def test_an_old_sdterm_chunk_reads_back(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("sdterm", OLD_SDTERM_CHUNK)
    path = tmp_path / "old.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    found = read_png_parameters(path)
    assert (found.source, found.params, found.model, found.model_hash) == (
        "sdterm", THE_RENDER, "v1-5-pruned-emaonly", "6ce0161689")
    assert found.extra == {"demo": "false"}


# What the same render writes since issue 13: the chunk is the old one and the new fields; the text
# is the old one and "RNG: CPU" where A1111 1.10 puts it (a text without RNG means A1111's GPU noise).
# A1111 would also write "Schedule type: Automatic" after the sampler; sdterm leaves it out (a text
# without it reads as Automatic in both).
NEW_INFOTEXT = OLD_INFOTEXT.replace("Model: v1-5-pruned-emaonly,", "Model: v1-5-pruned-emaonly, RNG: CPU,")


def test_the_png_texts_are_written_as_before_and_more():
    chunk = json.loads(sdterm_chunk(THE_RENDER, "v1-5-pruned-emaonly", "6ce0161689", {"demo": False}))
    old = json.loads(OLD_SDTERM_CHUNK)
    assert chunk == {**old, "request": {**old["request"], **NEW_KEYS}}
    assert NEW_INFOTEXT != OLD_INFOTEXT and infotext(THE_RENDER, "v1-5-pruned-emaonly", "6ce0161689") == NEW_INFOTEXT
    import io

    with Image.open(io.BytesIO(png_bytes(Image.new("RGB", (8, 8)), THE_RENDER, "v1-5-pruned-emaonly",
                                         "6ce0161689", {"demo": False}))) as im:
        assert (json.loads(im.info["sdterm"]), im.info["parameters"]) == (chunk, NEW_INFOTEXT)


def test_the_old_infotext_reads_as_a1111_text_and_the_new_one_as_the_render():
    from sdterm.pngmeta import params_from_infotext

    old = params_from_infotext(OLD_INFOTEXT)  # no RNG: A1111's GPU noise, which sdterm's nv reproduces
    assert old.params == THE_RENDER.replace(rng="nv")
    assert params_from_infotext(NEW_INFOTEXT).params == THE_RENDER


def test_leaf_modules_import_nothing_heavy():
    code = ("import sys, sdterm.params, sdterm.units, sdterm.errors; "
            "print(sorted(m for m in sys.modules if m.startswith('sdterm.') "
            "and m not in ('sdterm.params', 'sdterm.units', 'sdterm.errors', 'sdterm.samplers')), "
            "[m for m in ('torch', 'textual', 'rich', 'omegaconf', 'PIL') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_batch_counts_seeds_up_as_a1111_and_wraps():
    from sdterm.params import batch

    base = Params(prompt="x", seed=MAX_SEED - 1, subseed=7, subseed_strength=0.0)
    seeds = [p.seed for p in batch(base, 3)]
    assert seeds == [MAX_SEED - 1, MAX_SEED, 0]
    assert [p.subseed for p in batch(base, 3)] == [7, 7, 7]  # no variation: the subseed is not in play
    varied = base.replace(subseed_strength=0.3)
    assert [p.subseed for p in batch(varied, 3)] == [7, 8, 9]
    with pytest.raises(ConfigError, match="batch count"):
        batch(base, 0)
