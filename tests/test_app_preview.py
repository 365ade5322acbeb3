"""Live previews in the app (issue 17), through Pilot on the demo model (tests/test_app.py's helpers)."""

from __future__ import annotations

import pytest

from sdterm.ui.widgets.image_view import ImageView
from tests import test_app
from tests.test_app import SIZE, enter, held_reached, make_app, render, settle

engine, real_engine = test_app.engine, test_app.real_engine  # the fixtures
pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


def caption(app) -> str:
    return str(app.query_one(ImageView).query_one("#caption").render())


async def test_preview_frames_reach_the_image_panel_then_the_image_replaces_them(engine, tmp_path, monkeypatch):
    shown = []
    real = ImageView.show_preview

    def spy(self, image, text, size=None):
        drawn = real(self, image, text, size)
        shown.append((image.size, text, drawn))
        return drawn

    monkeypatch.setattr(ImageView, "show_preview", spy)
    app = make_app(engine, tmp_path, steps=4, width=64, height=48)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "a fox")
        assert engine.options[-1]["preview"] == pytest.approx(1 / 8)
        assert shown and all(size == (8, 6) for size, _, _ in shown)
        assert shown[0][1] == "preview · step 1/4" and shown[0][2] is True  # the first frame is drawn
        assert shown[-1][1] == "preview · step 4/4"  # the last step always sends one
        view = app.query_one(ImageView)
        assert not view.previewing and caption(app).startswith("seed ")  # the final image took its place


async def test_a_cancelled_render_leaves_its_last_preview_marked_cancelled(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=4)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "a fox")
        await held_reached(pilot, engine)
        await pilot.press("escape")
        engine.release()  # step 1's preview goes out, then the render stops at step 2
        await settle(pilot)
        assert engine.outcomes == ["cancelled"]
        view = app.query_one(ImageView)
        assert view.previewing and caption(app) == "preview · step 1/4 · cancelled"


async def test_a_batch_shows_no_previews(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=2)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/n 2")
        await render(pilot, "a fox")
        await settle(pilot)
        assert [o.get("preview") for o in engine.options] == [None, None]
        assert not app.query_one(ImageView).previewing
