"""img2img through the engine: every sampler makes exactly the steps and model calls
``sampler_plan`` says (what the progress bar and the U-Net streamer rely on), the init image's
latent is encoded before the seed's noise is drawn, and a bad init file is one line. The numbers
against diffusers and k-diffusion are tests/test_img2img.py."""

from __future__ import annotations

import pytest

from sdterm.engine.events import StepDone
from sdterm.engine.init_image import InitImageError
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.sampling.img2img import t_enc
from sdterm.engine.sampling.schedules import sampler_plan
from sdterm.samplers import SAMPLER_LIST, resolve_schedule

from .conftest import small_request

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have")]


@pytest.fixture(scope="module")
def engine(demo_model):
    return Engine(open_model(demo_model), "cpu")


@pytest.fixture(scope="module")
def init_png(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    engine.generate(small_request(steps=2)).image.save(path)
    return path


def test_t_enc_is_a1111s():
    assert [t_enc(s, 20) for s in (0.0, 0.3, 0.57, 0.6, 0.999, 1.0)] == [0, 6, 11, 12, 19, 19]
    assert t_enc(0.57, 100) == 56  # int(0.57 * 100) in Python floats, as A1111 computes it


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLER_LIST])
def test_every_sampler_makes_the_planned_steps_and_calls(engine, init_png, sampler, monkeypatch):
    unet = engine.models.module("unet")
    calls = []
    forward = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    steps_seen: list[StepDone] = []
    req = small_request(steps=8, sampler=sampler, cfg=1.0, init_image=str(init_png), strength=0.6)
    engine.generate(req, emit=lambda e: isinstance(e, StepDone) and steps_seen.append(e))
    info = next(s for s in SAMPLER_LIST if s.name == sampler)
    total, planned = sampler_plan(info, resolve_schedule(sampler, "Automatic"), 8, 0, t_enc(0.6, 8))
    assert len(calls) == planned
    assert [e.step for e in steps_seen] == list(range(1, total + 1)) and all(e.total == total for e in steps_seen)
    # fewer steps than the same render from noise
    assert total < sampler_plan(info, resolve_schedule(sampler, "Automatic"), 8)[0] + 1


def test_the_init_image_changes_the_result_and_strength_matters(engine, init_png, tmp_path):
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(other)
    render = lambda path, s: engine.generate(small_request(steps=6, init_image=str(path), strength=s)).latents  # noqa: E731
    a, b = render(init_png, 0.5), render(other, 0.5)
    assert not (a == b).all()
    assert not (render(init_png, 0.3) == a).all()
    txt2img = engine.generate(small_request(steps=6)).latents
    assert not (txt2img == a).all()


def test_a_bad_init_image_is_one_line_before_any_work(engine, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    unet = engine.models.module("unet")
    with pytest.raises(InitImageError) as info:
        engine.generate(small_request(init_image=str(bad)))
    assert "notes.txt" in str(info.value) and "\n" not in str(info.value)
    assert unet is engine.models.module("unet")
