"""Clip skip from the outside: `--clip-skip`, `/clipskip`, the infotext's "Clip skip: N" written and
read, `sdterm show`'s generate line, and that it reaches the encoder (the image changes). Its numbers
against transformers' CLIPTextModel are tests/test_conditioning.py."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdterm.commands import parse_command
from sdterm.history import History
from sdterm.params import Params
from sdterm.pngmeta import infotext, params_from_infotext
from sdterm.session import Session
from sdterm.show import generate_command

SMALL = ["--width", "64", "--height", "64", "--steps", "3", "--seed", "4"]


def test_generate_clip_skip_changes_the_image_and_is_recorded(demo_model, tmp_path, run_cli):
    code, out1, err = run_cli("generate", "a red fox", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    code, out2, err = run_cli("generate", "a red fox", "--model", demo_model, "--outdir", tmp_path, *SMALL,
                              "--clip-skip", "2")
    assert code == 0, err
    with Image.open(out1.strip()) as a, Image.open(out2.strip()) as b:
        assert "Clip skip" not in a.text["parameters"]
        assert "Clip skip: 2" in b.text["parameters"]
        assert not np.array_equal(np.asarray(a), np.asarray(b)), "clip skip never reached the text encoder"
    code, out, err = run_cli("generate", "x", "--clip-skip", "13", "--outdir", tmp_path)
    assert code != 0 and "clip skip must be between 1 and 12" in err and err.count("\n") == 1


def test_a1111_clip_skip_is_read_and_show_reproduces_it():
    found = params_from_infotext("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, "
                                 "Clip skip: 2")
    assert found.params.clip_skip == 2 and "Clip skip" not in found.extra
    assert "--clip-skip 2" in generate_command(found)
    again = params_from_infotext(infotext(found.params, "m", "h"))
    assert again.params.clip_skip == 2


def test_slash_clipskip_sets_it_and_the_parameter_line_says_so(tmp_path):
    session = Session(Params(), History(tmp_path / "h.jsonl"))
    outcome = session.apply(parse_command("/clipskip 2"))
    assert session.params.clip_skip == 2 and outcome.message == "clip skip 2"
    assert "clip skip 2" in session.describe()
    session.apply(parse_command("/clipskip 1"))
    assert "clip skip" not in session.describe()
