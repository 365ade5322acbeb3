"""The prompt/command interaction, loading, batches and the keys on the image (issue 12), through
Pilot on the demo model (the helpers and the watched engine are tests/test_app.py's)."""

from __future__ import annotations

import threading

import pytest
from PIL import Image
from textual import events
from textual.widgets import Input, Static

from sdterm.history import History, history_file
from sdterm.params import Params
from sdterm.service import RenderService
from sdterm.session import Session
from sdterm.ui.app import SdtermApp
from sdterm.ui.prompting import split_trailing_command
from sdterm.ui.screens import HelpScreen, HistoryScreen
from sdterm.ui.widgets.image_view import ImageView
from tests.test_app import (  # noqa: F401 (fixtures)
    SIZE, SMALL, TIMEOUT, caption, engine, enter, make_app, notice, outputs, real_engine, render, settle, wait_until,
)
from tests.test_prompt_burst import burst, keys

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


def params_line(app) -> str:
    return str(app.query_one("#params", Static).render())


# ---- a command after a render -------------------------------------------------------------------


async def test_a_slash_after_a_render_is_a_command_and_the_prompt_comes_back(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=3)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        await render(pilot, "a red fox")
        assert box.value == "a red fox"
        await pilot.press(*"/steps 4", "enter")
        await pilot.pause()
        assert app.session.params.steps == 4 and notice(app) == "steps 4"
        assert box.value == "a red fox" and len(engine.requests) == 1
        # The same in one burst, typed ahead: nothing is appended to the prompt, nothing renders.
        burst(app, *keys("/cfg 5"), "enter")
        await wait_until(pilot, lambda: app.session.params.cfg == 5, "the /cfg command")
        await settle(pilot)
        assert box.value == "a red fox" and len(engine.requests) == 1
        # Esc (or Backspace over the bare slash) brings the prompt back without a command.
        await pilot.press("slash")
        assert box.value == "/" and box.stashed == "a red fox"
        await pilot.press("escape")
        assert box.value == "a red fox" and box.stashed is None
        await pilot.press("slash", "backspace")
        assert box.value == "a red fox"
        # Once the prompt is being edited, a slash is text ("AC/DC").
        await pilot.press("end", *"/DC")
        assert box.value == "a red fox/DC"
        await pilot.press("enter")
        await settle(pilot)
        assert engine.requests[-1].prompt == "a red fox/DC"


async def test_a_command_typed_after_an_edited_prompt_runs_and_renders_nothing(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "a cat, blue /steps 5")
        await pilot.pause()
        assert app.session.params.steps == 5 and engine.requests == []
        assert app.query_one("#prompt", Input).value == "a cat, blue"
        assert "Enter renders it" in notice(app)
        await enter(pilot, "a cat /steps x")
        await pilot.pause()
        assert "steps" in notice(app) and engine.requests == []


def test_split_trailing_command():
    assert split_trailing_command("a cat /steps 50")[0] == "a cat"
    assert split_trailing_command("a cat /steps 50")[1].name == "steps"
    assert split_trailing_command("AC/DC live") is None
    assert split_trailing_command("a cat /b c") is None  # not a command's name: the prompt's text
    assert split_trailing_command("a/b /cfg 4")[0] == "a/b"


# ---- recall keeps the settings -------------------------------------------------------------------


async def test_up_recalls_the_prompt_and_keeps_the_settings_changed_since(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=3, negative="fog")
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "owl")
        await enter(pilot, "/steps 4")
        await enter(pilot, "/cfg 3")
        app.query_one("#negative", Input).value = "rain"
        await pilot.press("ctrl+u", "up")
        box = app.query_one("#prompt", Input)
        assert box.value == "owl"
        p = app.session.params
        assert (p.steps, p.cfg) == (4, 3.0), "Up undid settings changed since"
        assert app.query_one("#negative", Input).value == "fog" and p.negative == "fog"
        assert "settings kept" in notice(app)


# ---- Enter on the image, the existing image again ---------------------------------------------


async def test_enter_on_the_image_renders_again_with_the_current_settings(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=40, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        await enter(pilot, "/cfg 2")
        await pilot.press("tab", "enter")
        await settle(pilot)
        assert [(r.seed, r.cfg) for r in engine.requests] == [(40, 7.5), (40, 2.0)]


async def test_seed_keys_show_an_image_already_made_instead_of_rendering_it(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=10, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        await pilot.press("tab", "right_square_bracket")
        await settle(pilot)
        await pilot.press("left_square_bracket")
        await settle(pilot)
        assert [r.seed for r in engine.requests] == [10, 11], "seed 10 was rendered twice"
        assert "already rendered" in notice(app) and "seed 10" in caption(app)
        assert app.session.params.seed == 10 and app.session.last_path.endswith("-10.png")
        await pilot.press("v")
        await settle(pilot)
        await pilot.press("V")  # back to 0: the image from before the variation
        await settle(pilot)
        assert len(engine.requests) == 3 and "already rendered" in notice(app)
        # Enter on the image renders anew, on purpose.
        await pilot.press("enter")
        await settle(pilot)
        assert len(engine.requests) == 4


# ---- focus, help, zoom -----------------------------------------------------------------------------


async def test_tab_back_into_the_prompt_does_not_select_it(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"fox")
        await pilot.press("tab", "tab", "tab")
        assert app.focused is app.query_one("#prompt")
        await pilot.press("s")
        assert app.query_one("#prompt", Input).value == "foxs"


async def test_help_opens_with_f1_anywhere_and_question_mark_in_an_empty_prompt(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("question_mark")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press(*"why?")
        assert app.query_one("#prompt", Input).value == "why?" and not isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("f1")
        assert app.query_one("#prompt", Input).value == "why?"


async def test_z_zooms_the_image_and_tab_brings_the_prompt_back(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await render(pilot, "fox")
        small = app.query_one(ImageView).size
        await pilot.press("tab", "z")
        await pilot.pause()
        assert app.screen.has_class("zoomed") and not app.query_one("#panel").display or \
            app.query_one("#panel").region.width == 0
        big = app.query_one(ImageView).size
        assert big.width > small.width and big.height > small.height
        await pilot.press("tab")
        assert not app.screen.has_class("zoomed")


# ---- paste ----------------------------------------------------------------------------------------


async def test_pasting_an_a1111_block_sets_the_prompt_and_every_setting(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=3, seed=1)
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(events.Paste("a lighthouse, (storm:1.2)\nNegative prompt: fog\n"
                                      "Steps: 4, Sampler: DDIM, CFG scale: 6, Seed: 77, Size: 64x48, Model: x"))
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == "a lighthouse, (storm:1.2)"
        assert app.query_one("#negative", Input).value == "fog"
        p = app.session.params
        assert (p.seed, p.steps, p.cfg, p.width, p.height) == (77, 4, 6.0, 64, 48)
        assert "pasted parameters" in notice(app)
        await pilot.press("enter")
        await settle(pilot)
        assert (engine.requests[-1].seed, engine.requests[-1].prompt) == (77, "a lighthouse, (storm:1.2)")
        # Several lines of plain text: all of it, joined, never only the first line.
        await pilot.press("ctrl+u")
        app.post_message(events.Paste("a fox\nin the snow\n"))
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == "a fox in the snow"


# ---- loading, models ---------------------------------------------------------------------------


def lazy_app(engine, tmp_path, gate: threading.Event, calls: list, fail: Exception | None = None, **params):
    history = History(history_file())
    session = Session(Params(**{**SMALL, **params}), history)

    def load(name, progress):
        calls.append(name)
        progress("reading the checkpoint")
        assert gate.wait(TIMEOUT)
        if fail is not None and name is None:
            raise fail
        return RenderService(engine, tmp_path / "out", history)

    return SdtermApp(None, session, load=load, model_names=lambda: ["demo", "other"], image_protocol="halfcell")


async def test_the_screen_is_up_and_takes_a_prompt_while_the_model_loads(engine, tmp_path):
    gate, calls = threading.Event(), []
    app = lazy_app(engine, tmp_path, gate, calls)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "reading the checkpoint" in notice(app), "the loading line")
        assert "loading" in params_line(app)
        await enter(pilot, "fox", typed=True)
        await pilot.pause()
        assert "queued" in notice(app) and engine.requests == []
        app._show_loading()  # the loading line's next tick keeps the queued render on it
        assert "queued seed" in notice(app) and "reading the checkpoint" in notice(app)
        gate.set()
        await wait_until(pilot, lambda: len(engine.requests) == 1, "the queued render")
        await settle(pilot)
        assert outputs(tmp_path) and "model demo" in params_line(app)
        # /model NAME loads another (the same stand-in here), then renders again.
        await enter(pilot, "/model other")
        await wait_until(pilot, lambda: calls == [None, "other"] and app.engine is not None, "the switch")
        assert "ready" in notice(app)


async def test_a_model_that_fails_to_load_is_one_line_and_the_app_stays(engine, tmp_path):
    from sdterm.errors import UserError

    gate, calls = threading.Event(), []
    gate.set()
    app = lazy_app(engine, tmp_path, gate, calls, fail=UserError("model.ckpt: not a checkpoint"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "not a checkpoint" in notice(app), "the error line")
        assert "/model NAME" in notice(app) and app.is_running and app.internal_errors == []
        await enter(pilot, "fox")
        await pilot.pause()
        assert "no model loaded" in notice(app) and engine.requests == []
        await enter(pilot, "/model demo")
        await wait_until(pilot, lambda: app.engine is not None, "the other model")


# ---- batch and contact sheet, numbered history ------------------------------------------------------


async def test_a_batch_renders_n_seeds_on_a_contact_sheet_and_a_pick_works_on_it(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=500, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/n 3")
        assert "×3" in params_line(app)
        await enter(pilot, "fox")
        await wait_until(pilot, lambda: len(engine.requests) == 3 and not app.busy, "the batch")
        assert [r.seed for r in engine.requests] == [500, 501, 502]
        assert len(outputs(tmp_path)) == 3
        view = app.query_one(ImageView)
        await pilot.press("tab")
        assert app.focused is view
        await pilot.press("right", "enter")
        await pilot.pause()
        assert app.session.params.seed == 501
        assert "picked seed 501" in notice(app)


async def test_history_list_and_bang_n_restore_an_entry_with_its_settings(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=3, seed_locked=True, steps=3)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "first")
        await enter(pilot, "/steps 2")
        await render(pilot, "second")
        await enter(pilot, "!1")
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == "first" and app.session.params.steps == 3
        await enter(pilot, "/history")
        await pilot.pause()
        assert isinstance(app.screen, HistoryScreen)
        await pilot.press("enter")  # the newest first: "second"
        await pilot.pause()
        assert not isinstance(app.screen, HistoryScreen)
        assert app.query_one("#prompt", Input).value == "second" and app.session.params.steps == 2


async def test_open_shows_an_image_file_in_the_panel(engine, tmp_path):
    app = make_app(engine, tmp_path)
    png = tmp_path / "look [here].png"
    Image.new("RGB", (16, 8), (255, 0, 0)).save(png)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, f"/open {png}")
        await pilot.pause()
        assert "look [here].png" in caption(app) and "16×8" in caption(app)
        await enter(pilot, "/open missing.png")
        await pilot.pause()
        assert "missing.png" in notice(app) and "16×8" in caption(app)


# ---- the sampler (issue 13) --------------------------------------------------------------------------


async def test_s_on_the_image_picks_the_sampler_and_the_next_render_uses_it(engine, tmp_path):
    from textual.widgets import OptionList

    from sdterm.samplers import SAMPLER_LIST
    from sdterm.ui.screens import SamplerScreen

    app = make_app(engine, tmp_path, steps=3, seed=5, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        await pilot.press("tab")  # the image
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, SamplerScreen)
        box = app.screen.query_one(OptionList)
        names = [s.name for s in SAMPLER_LIST]
        assert box.highlighted == names.index("DDIM") and box.option_count == len(names)
        await pilot.press("escape")  # Esc changes nothing
        await pilot.pause()
        assert not isinstance(app.screen, SamplerScreen) and app.session.params.sampler == "DDIM"
        await pilot.press("s", "home", "enter")  # the first: DPM++ 2M
        await pilot.pause()
        assert not isinstance(app.screen, SamplerScreen)
        assert app.session.params.sampler == "DPM++ 2M" and notice(app) == "sampler DPM++ 2M Karras"
        assert "DPM++ 2M Karras · 3 steps" in params_line(app)
        # The next render carries it (what the engine makes of it is the engine's tests').
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(engine.requests) == 2, "the render with the new sampler")
        await settle(pilot)
        assert (engine.requests[-1].sampler, engine.requests[-1].schedule) == ("DPM++ 2M", "Automatic")
        # In the prompt box "s" is a letter, not the picker.
        await pilot.press("tab", "tab")
        assert app.focused is app.query_one("#prompt", Input)
        await pilot.press("s")
        assert not isinstance(app.screen, SamplerScreen)


async def test_sampler_commands_in_the_app_complete_and_set(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=3)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/sampler lms karras")
        await pilot.pause()
        assert (app.session.params.sampler, app.session.params.schedule) == ("LMS", "Karras")
        assert notice(app) == "sampler LMS Karras" and "LMS Karras" in params_line(app)
        await enter(pilot, "/rng nv")
        await pilot.pause()
        assert app.session.params.rng == "nv" and "rng nv" in params_line(app)
        await enter(pilot, "/sampler Euler b")
        await pilot.pause()
        assert notice(app).startswith("unknown sampler 'Euler b'; one of: DPM++ 2M, ")
        assert app.session.params.sampler == "LMS"


async def test_a_pasted_a1111_block_sets_the_sampler_and_a1111s_noise(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=3, seed=1)
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(events.Paste("a lighthouse\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 77, "
                                      "Size: 64x48, ENSD: 31337"))
        await pilot.pause()
        p = app.session.params
        assert (p.sampler, p.schedule, p.rng, p.ensd, p.seed) == ("DPM++ 2M", "Automatic", "nv", 31337, 77)
        assert "DPM++ 2M Karras · 4 steps" in notice(app) and "rng nv" in params_line(app)
        # A sampler sdterm lacks: the rest is taken, the sampler stays, and the notice says so.
        app.post_message(events.Paste("a boat\nSteps: 5, Sampler: DPM adaptive, CFG scale: 6, Seed: 8, RNG: CPU"))
        await pilot.pause()
        p = app.session.params
        assert (p.sampler, p.steps, p.seed, p.rng) == ("DPM++ 2M", 5, 8, "cpu")
        assert "sampler DPM adaptive is not one sdterm has: DPM++ 2M will be used" in notice(app)


async def test_a_pasted_block_without_eta_or_variation_means_a1111s_defaults(engine, tmp_path):
    """A1111 leaves out "Eta DDIM", "Variation seed" and "ENSD" at their defaults: a block without
    them must not keep this session's eta or variation (the image would not be the author's)."""
    app = make_app(engine, tmp_path, eta=0.5, subseed=9, subseed_strength=0.3, ensd=5)
    async with app.run_test(size=SIZE) as pilot:
        app.post_message(events.Paste("a lighthouse\nSteps: 4, Sampler: DDIM, CFG scale: 6, Seed: 77, Size: 64x48"))
        await pilot.pause()
        p = app.session.params
        assert (p.eta, p.subseed_strength, p.ensd, p.steps) == (0.0, 0.0, 0, 4)
