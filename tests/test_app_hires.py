"""The hires fix in the app (issue 16), through Pilot on the demo model (the helpers and the watched
engine are tests/test_app.py's): /hires, the render and its PNG, i on a hires image, /load of A1111's."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from tests import test_app
from tests.test_app import SIZE, enter, held_reached, make_app, notice, png_parameters, render, settle
from tests.test_app_draft import params_line

engine, real_engine = test_app.engine, test_app.real_engine  # the fixtures
pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


async def test_hires_renders_at_the_hires_size_and_i_refines_the_big_image(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=5, seed_locked=True, steps=2, width=64, height=48)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/hires 2x steps=2")
        await pilot.pause()
        assert "hires 2x→128x96 Latent 2 steps 0.70" in params_line(app)
        await render(pilot, "a fox")
        req = engine.requests[-1]
        assert (req.hires_scale, req.hires_steps, req.width, req.height) == (2.0, 2, 64, 48)
        first = Path(app.session.last_path)
        with Image.open(first) as im:
            assert im.size == (128, 96)
        text = png_parameters(first)
        assert "Size: 64x48" in text and "Denoising strength: 0.7" in text and "Hires upscale: 2" in text
        # i on a hires image: img2img of the image shown, at its size, the hires fix off
        engine.hold()
        await pilot.press("tab", "i")
        await held_reached(pilot, engine)
        toasts = [str(n.message) for n in app._notifications]  # the notice line is the render's by now
        assert toasts == ["hires fix off: img2img at the image's 128×96"]
        engine.release()
        await settle(pilot)
        req = engine.requests[-1]
        assert (req.init_image, req.width, req.height, req.hires) == (str(first.resolve()), 128, 96, False)
        assert "hires" not in params_line(app) and "img2img" in params_line(app)


async def test_load_of_an_a1111_hires_png_restores_it_and_says_what_is_missing(engine, tmp_path):
    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse\nSteps: 4, Sampler: DDIM, CFG scale: 6, Seed: 77, Size: 64x48, "
                                "Model: x, Denoising strength: 0.4, Hires resize: 128x0, Hires steps: 3, "
                                "Hires upscaler: [b]R-ESRGAN 4x+")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, f"/load {png}")
        await pilot.pause()
        p = app.session.params
        assert (p.width, p.height, p.hires_width, p.hires_height, p.hires_steps, p.hires_strength, p.hires_upscaler) \
            == (64, 48, 128, 0, 3, 0.4, "Lanczos")
        assert "hires upscaler [b]R-ESRGAN 4x+: sdterm has only the built-in ones (no ESRGAN); Lanczos is used" \
            in notice(app)  # the image's text shown as it is, never as markup
        assert "hires 128x0→128x96 Lanczos 3 steps 0.40" in params_line(app)
