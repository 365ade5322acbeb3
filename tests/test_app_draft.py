"""Draft mode, /vae and the LoRA tags of the prompt in the app (issue 15), through Pilot on the
demo model (the helpers and the watched engine are tests/test_app.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual import events
from textual.widgets import Input, Static

from sdterm import paths
from tests.test_app import (  # noqa: F401 (fixtures)
    SIZE, engine, enter, error_styled, history_lines, make_app, notice, png_parameters, real_engine, render, settle,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


def params_line(app) -> str:
    return str(app.query_one("#params", Static).render())


def used(req) -> tuple:
    return (req.sampler, req.steps, req.cfg)


async def test_draft_toggle_full_quality_key_and_draft_off(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=40, seed_locked=True, steps=3, cfg=7.0, sampler="Euler")
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        assert app.session.draft and params_line(app).startswith("DRAFT LCM 4 steps cfg 1.5 · seed 40")
        assert "full: Euler 3 steps CFG 7" in params_line(app)
        await render(pilot, "a fox")
        assert used(engine.requests[-1]) == ("LCM", 4, 1.5) and engine.requests[-1].seed == 40
        # what was rendered is what the history and the PNG say
        assert (history_lines()[-1]["sampler"], history_lines()[-1]["steps"]) == ("LCM", 4)
        text = png_parameters(Path(app.session.last_path))
        assert "Steps: 4" in text and "Sampler: LCM" in text and "CFG scale: 1.5" in text
        # F3: the image shown, full settings, same seed and size, draft still on
        await pilot.press("f3")
        await settle(pilot)
        full = engine.requests[-1]
        assert used(full) == ("Euler", 3, 7.0) and (full.seed, full.width, full.prompt) == (40, 64, "a fox")
        assert app.session.draft and params_line(app).startswith("DRAFT ")
        # the seed key on the image: a draft again; f on the image is F3 too, d toggles
        await pilot.press("tab", "right_square_bracket")
        await settle(pilot)
        assert used(engine.requests[-1]) == ("LCM", 4, 1.5) and engine.requests[-1].seed == 41
        await pilot.press("f")
        await settle(pilot)
        assert used(engine.requests[-1]) == ("Euler", 3, 7.0) and engine.requests[-1].seed == 41
        await pilot.press("d")
        assert not app.session.draft and "DRAFT" not in params_line(app)
        await pilot.press("d")
        assert app.session.draft
        await enter(pilot, "/draft off")
        await pilot.pause()
        assert "draft off" in notice(app) and "DRAFT" not in params_line(app)
        await render(pilot, "an owl")
        assert used(engine.requests[-1]) == ("Euler", 3, 7.0)


async def test_a_recalled_draft_render_brings_back_the_full_settings(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=7, seed_locked=True, steps=3, cfg=6.0)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/draft on")
        await render(pilot, "a fox")
        await enter(pilot, "/draft off")
        await enter(pilot, "!1")
        await pilot.pause()
        p = app.session.params
        assert (p.sampler, p.steps, p.cfg, p.seed) == ("DDIM", 3, 6.0, 7)
        assert "a draft" in notice(app) and app.query_one("#prompt", Input).value == "a fox"
        await pilot.press("enter")
        await settle(pilot)
        assert used(engine.requests[-1]) == ("DDIM", 3, 6.0) and engine.requests[-1].seed == 7


async def test_vae_with_a_bad_file_is_one_line_and_the_app_stays(engine, tmp_path):
    paths.vae_dir().mkdir(parents=True)
    (paths.vae_dir() / "broken.safetensors").write_bytes(b"not a safetensors file")
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/vae broken")
        await settle(pilot)
        line = notice(app)
        assert "broken.safetensors" in line and "\n" not in line and error_styled(app.query_one("#notice"))
        assert app.is_running and not app.busy and "VAE" not in params_line(app)
        await render(pilot, "a fox")  # renders as before
        assert engine.outcomes[-1] == "done"
        await enter(pilot, "/vae")
        await pilot.pause()
        assert "broken.safetensors" in notice(app) and "default" in notice(app)
        await enter(pilot, "/vae default")
        await settle(pilot)
        assert "model’s own" in notice(app)


async def test_vae_asked_during_a_render_switches_after_it(engine, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(type(engine._engine), "set_vae", lambda self, path: calls.append(path), raising=False)
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "a fox")
        await pilot.pause()
        await enter(pilot, "/vae default")
        await pilot.pause()
        assert calls == [] and "after this render" in notice(app)
        engine.release()
        await settle(pilot)
        await pilot.pause(0.2)
        assert calls == [None]


async def test_vae_completion_in_the_prompt_box(engine, tmp_path):
    paths.vae_dir().mkdir(parents=True)
    (paths.vae_dir() / "ft-mse.safetensors").write_bytes(b"")
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"/vae f")
        await pilot.pause(0.2)
        await pilot.press("right")
        assert app.query_one("#prompt", Input).value == "/vae ft-mse.safetensors"


async def test_loras_of_the_prompt_on_the_parameter_line_live_and_literal(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        box.focus()
        app.post_message(events.Paste("a fox <lora:[bold]x:1> <lora:detail:0.8>"))
        await pilot.pause()
        assert "LoRA [bold]x×1, detail×0.8" in params_line(app)
        await pilot.press("ctrl+u")
        await pilot.pause()
        assert "LoRA" not in params_line(app)
        app.post_message(events.Paste("a fox <lora:x:abc>"))
        await pilot.pause()
        assert "<lora:x:abc>: the text-encoder weight 'abc' is not a number" in params_line(app)
        await pilot.press("ctrl+u")
        # /lora edits the prompt box
        app.post_message(events.Paste("an owl /lora detail:0.5"))
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
        assert box.value == "an owl <lora:detail:0.5>" and "LoRA detail×0.5" in params_line(app)
        await pilot.press("slash", *"lora -detail", "enter")  # the prompt waits aside, then comes back edited
        await pilot.pause()
        assert box.value == "an owl" and engine.requests == []


async def test_load_of_an_image_made_with_a_vae_switches_to_it_or_says_it_is_missing(engine, tmp_path, monkeypatch):
    from PIL import Image, PngImagePlugin

    calls = []
    monkeypatch.setattr(type(engine._engine), "set_vae", lambda self, path: calls.append(path), raising=False)

    def a1111_png(name: str, vae: str | None) -> Path:
        info = PngImagePlugin.PngInfo()
        tail = f", VAE hash: f921fb3f29, VAE: {vae}" if vae else ""
        info.add_text("parameters", f"a fox\nSteps: 3, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 64x64, "
                                    f"Model hash: 0123456789, Model: demo{tail}")
        path = tmp_path / name
        Image.new("RGB", (64, 64)).save(path, pnginfo=info)
        return path

    paths.vae_dir().mkdir(parents=True)
    (paths.vae_dir() / "kl-f8-anime2.safetensors").write_bytes(b"")
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, f"/load {a1111_png('plain.png', None)}")
        await settle(pilot)
        assert calls == []  # no VAE named: the VAE stays
        await enter(pilot, f"/load {a1111_png('missing.png', 'vae-ft-mse.ckpt')}")
        await settle(pilot)
        assert calls == [] and "vae-ft-mse.ckpt" in notice(app) and "not in" in notice(app)
        await enter(pilot, f"/load {a1111_png('anime.png', '../../etc/kl-f8-anime2.safetensors')}")
        await settle(pilot)
        await pilot.pause(0.2)
        assert calls == [paths.vae_dir() / "kl-f8-anime2.safetensors"]  # by name, in the vae folder only


async def test_i_on_the_image_refines_it_as_the_init_image(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=9, seed_locked=True, steps=3)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("tab", "i")
        await pilot.pause()
        assert "no image yet" in notice(app) and not engine.requests
        await pilot.press("shift+tab")
        await render(pilot, "a fox")
        first = app.session.last_path
        await enter(pilot, "/strength 0.4")
        await pilot.press("tab", "i")
        await settle(pilot)
        req = engine.requests[-1]
        assert (req.init_image, req.strength, req.prompt, req.seed) == (str(Path(first).resolve()), 0.4, "a fox", 9)
        assert "img2img 0.40" in params_line(app)
        refined = app.session.last_path
        assert refined != first
        await pilot.press("i")  # again: the refined image is the next init image
        await settle(pilot)
        assert engine.requests[-1].init_image == str(Path(refined).resolve())
