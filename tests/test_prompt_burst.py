"""Keys in a burst (type-ahead over a slow link, keys and a paste read from the terminal in one
go) take effect in the order they were typed.

Pilot's ``press`` waits for the app to go idle after every key, so it never shows the bug: here
the keys are handed to the driver all at once, as the terminal driver does with one read of
several keys, and only then does the test wait. Before the fix Textual applied a bound key
(Ctrl+U, BackSpace, Home/End, Enter) only once its event had bubbled up to the App, i.e. after the
characters queued behind it.
"""

from __future__ import annotations

import pytest
from textual import events
from textual.widgets import Input

from tests.test_app import SIZE, engine, make_app, notice, real_engine, settle, wait_until  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


def burst(app, *items) -> None:
    """Queue keys (names as Pilot spells them) and pastes (``events.Paste``) without waiting."""
    from textual.app import _character_to_key  # Pilot's own spelling of single characters

    for item in items:
        if isinstance(item, events.Paste):
            message = item
        else:
            key = _character_to_key(item) if len(item) == 1 and not item.isalnum() else item
            char = item if len(item) == 1 else (" " if key == "space" else None)
            message = events.Key(key, char)
        message.set_sender(app)
        app._driver.send_message(message)


def keys(text: str) -> list[str]:
    return list(text)


async def test_ctrl_u_then_a_command_then_enter_applies_the_command(engine, tmp_path):
    app = make_app(engine, tmp_path, cfg=7.5)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        box.value = "a red fox"  # the previous prompt, still in the box
        box.cursor_position = len(box.value)
        burst(app, "ctrl+u", *keys("/cfg 4"), "enter")
        await wait_until(pilot, lambda: notice(app) != "", "the notice line")
        await settle(pilot)
        assert engine.requests == [], "a render started with the old prompt"
        assert app.session.params.cfg == 4
        assert notice(app) == "CFG 4"
        assert box.value == ""


async def test_backspace_home_end_in_a_burst(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        burst(app, *keys("xyz"), "home", "Q", "end", "W")
        await wait_until(pilot, lambda: len(box.value) == 5, "five characters")
        assert box.value == "QxyzW"
        burst(app, "ctrl+u", *keys("abc"), "backspace", "d", "enter")
        await wait_until(pilot, lambda: engine.requests, "a render")
        await settle(pilot)
        assert [r.prompt for r in engine.requests] == ["abd"]


async def test_a_paste_in_a_burst_lands_in_order(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        burst(app, *keys("ab"), "backspace", events.Paste("PASTE"), "home", "<", "end", ">")
        await wait_until(pilot, lambda: box.value.endswith(">"), "the last key")
        assert box.value == "<aPASTE>"


async def test_keys_after_enter_start_the_next_line(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        burst(app, *keys("/steps 5"), "enter", *keys("/cfg 3"), "enter", *keys("fox"))
        await wait_until(pilot, lambda: notice(app) == "CFG 3", "the second command")
        await settle(pilot)
        assert (app.session.params.steps, app.session.params.cfg) == (5, 3)
        assert box.value == "fox" and engine.requests == []
        # A malformed command stays in the box to be corrected.
        burst(app, "ctrl+u", *keys("/steps"), "enter", "space", "6")
        await wait_until(pilot, lambda: "needs a value" in notice(app), "the error")
        await wait_until(pilot, lambda: box.value.endswith("6"), "the last key")
        assert box.value == "/steps 6" and "needs a value" in notice(app)


async def test_up_recalls_before_the_keys_typed_after_it(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        burst(app, *keys("fox"), "enter")
        await wait_until(pilot, lambda: engine.requests, "a render")
        await settle(pilot)
        burst(app, "ctrl+u", "up", *keys(" den"))
        await wait_until(pilot, lambda: box.value.endswith("n"), "the last key")
        assert box.value == "fox den"


async def test_enter_in_the_negative_box_renders_the_prompt(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#prompt", Input).value = "fox"
        app.query_one("#negative", Input).focus()
        await pilot.press(*"blurry", "enter")
        await wait_until(pilot, lambda: engine.requests, "a render")
        await settle(pilot)
        assert [(r.prompt, r.negative) for r in engine.requests] == [("fox", "blurry")]


async def test_tab_then_a_seed_key_in_one_burst_nudges_the_seed(engine, tmp_path):
    """Tab moves the focus to the image at once: the `]` right behind it is the image's seed key,
    not a character typed into the prompt (the tmux smoke test's sequence)."""
    app = make_app(engine, tmp_path, seed=41, seed_locked=True, steps=2, width=64, height=64)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        burst(app, *keys("fox"), "enter")
        await wait_until(pilot, lambda: len(engine.outcomes) == 1, "the first render")
        burst(app, "tab", "]")
        await wait_until(pilot, lambda: len(engine.outcomes) == 2, "the seed+1 render")
        assert [r.seed for r in engine.requests] == [41, 42]
        assert "]" not in box.value
