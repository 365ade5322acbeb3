"""Live previews (issue 17): the hook every sampler shares, the latent-to-RGB map, throttling."""

from __future__ import annotations

import pytest
import torch

from sdterm.engine.events import Preview, StepDone
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.preview import LATENT_RGB, latent_rgb
from sdterm.samplers import SAMPLER_LIST

from .conftest import small_request

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have")]


@pytest.fixture(scope="module")
def engine(demo_model):
    return Engine(open_model(demo_model), "cpu")


def collect(engine, req, preview=0.0):
    events = []
    result = engine.generate(req, emit=events.append, preview=preview)
    return result, [e for e in events if isinstance(e, Preview)], [e for e in events if isinstance(e, StepDone)]


def test_the_linear_map_turns_a_known_latent_into_the_expected_rgb():
    x0 = torch.zeros(1, 4, 2, 3)
    x0[0, 0, 0, 0] = 1.0   # channel 1 alone: (0.298, 0.207, 0.208)
    x0[0, 3, 0, 1] = 1.0   # channel 4 alone: (-0.184, -0.271, -0.473)
    x0[0, :, 1, 2] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # the column sums
    x0[0, 1, 1, 0] = 10.0  # far out: clamped to white
    rgb = latent_rgb(x0)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == torch.uint8

    def level(v):  # (v + 1) / 2 in [0, 1], 8-bit by truncation
        return int(min(max((v + 1) / 2, 0.0), 1.0) * 255)

    assert rgb[0, 0].tolist() == [level(0.298), level(0.207), level(0.208)] == [165, 153, 154]
    assert rgb[0, 1].tolist() == [level(-0.184), level(-0.271), level(-0.473)] == [104, 92, 67]
    sums = [sum(row[c] for row in LATENT_RGB) for c in range(3)]
    assert rgb[1, 2].tolist() == [level(s) for s in sums]
    assert rgb[1, 0].tolist() == [255, 255, 255] and rgb[0, 2].tolist() == [127, 127, 127]


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLER_LIST])
def test_every_sampler_sends_one_frame_a_step_of_the_latent_size(engine, sampler):
    req = small_request(steps=4, sampler=sampler, width=64, height=48)
    result, frames, steps = collect(engine, req)
    assert [(f.step, f.total) for f in frames] == [(s.step, s.total) for s in steps]
    assert all(f.image.size == (8, 6) and f.image.mode == "RGB" and f.stage == "unet" for f in frames)
    plain = engine.generate(req)
    assert torch.equal(plain.latents, result.latents)  # watching changes nothing


def test_the_frame_is_the_clean_latent_the_sampler_predicts(engine):
    """Euler's last step lands on the denoiser's prediction (x + (denoised - x) / sigma * (0 - sigma)):
    the last frame is the final latent through the map, and the first differs from the noise's."""
    result, frames, _ = collect(engine, small_request(steps=5, sampler="Euler", cfg=5.0))
    last = torch.from_numpy(__import__("numpy").asarray(frames[-1].image))
    assert torch.equal(last, latent_rgb(result.latents))
    first = torch.from_numpy(__import__("numpy").asarray(frames[0].image))
    assert not torch.equal(first, last)


def test_frames_are_throttled_and_the_last_step_always_sent(engine):
    _, frames, steps = collect(engine, small_request(steps=6, sampler="DDIM"), preview=3600.0)
    assert [(f.step, f.total) for f in frames] == [(1, 6), (6, 6)]  # the first, then nothing until the last
    _, none, _ = collect(engine, small_request(steps=6), preview=None)
    assert none == []


def test_the_hires_pass_has_frames_of_its_own(engine):
    _, frames, _ = collect(engine, small_request(steps=3, sampler="Euler", hires_scale=2.0, hires_steps=2))
    assert [(f.stage, f.step, f.image.size) for f in frames] == [
        ("unet", 1, (8, 8)), ("unet", 2, (8, 8)), ("unet", 3, (8, 8)), ("hires", 1, (16, 16)), ("hires", 2, (16, 16))]
