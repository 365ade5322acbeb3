"""Emphasis and scheduling from the outside: the same pictures through ``sdterm generate`` that
the rules say are the same (A1111's "Original" emphasis: weights multiply the encoder's output,
then the chunk's mean is restored). The numbers behind them are tests/test_conditioning.py and
tests/test_prompt_schedule.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--width", "64", "--height", "64", "--steps", "3", "--seed", "11", "--negative", "blurry"]


@pytest.fixture()
def render(demo_model, tmp_path, run_cli):
    def run(prompt: str) -> np.ndarray:
        code, out, err = run_cli("generate", prompt, "--model", demo_model, "--outdir", tmp_path, "--no-cache", *SMALL)
        assert code == 0, err
        with Image.open(out.strip()) as im:
            assert im.text["parameters"].splitlines()[0] == prompt  # the prompt is stored as typed
            return np.asarray(im, dtype=np.int16)

    return run


def test_weight_one_is_the_plain_prompt(render):
    assert np.array_equal(render("(red:1.0) fox"), render("red fox"))


def test_nesting_multiplies_and_square_brackets_divide(render):
    assert np.abs(render("((red)) fox") - render("(red:1.21) fox")).max() <= 1
    assert np.abs(render("[red] fox") - render("(red:0.909091) fox")).max() <= 1


def test_a_weight_and_a_schedule_change_the_picture(render):
    plain = render("red fox")
    assert np.abs(render("(red:1.6) fox") - plain).mean() > 0.5
    scheduled = render("[red:blue:1] fox")  # red for the first two denoiser calls, blue for the last
    assert not np.array_equal(scheduled, plain) and not np.array_equal(scheduled, render("blue fox"))


def test_escaped_brackets_are_text_not_weights(render):
    # \( \) are the characters themselves: the same tokens as a bare "(" ... ")" pair would not give.
    assert not np.array_equal(render(r"\(red\) fox"), render("(red) fox"))
