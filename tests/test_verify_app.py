"""``/verify`` in the app (issue 17, part 2), through Textual's Pilot on the demo model: the last
image rendered again on the app's engine in a worker, the verdict in one line on the notice line;
nothing written, nothing recorded; a render asked for meanwhile waits; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from . import test_app
from .test_app import SIZE, Held, error_styled, enter, held_reached, make_app, notice, outputs, render, settle

engine, real_engine = test_app.engine, test_app.real_engine  # the fixtures

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


def copy_png(src, dst, *, flip_row: bool = False, sdterm_chunk: bool = True, texts: bool = True):
    with Image.open(src) as im:
        im.load()
        meta, params, array = im.text.get("sdterm"), im.text.get("parameters"), np.asarray(im).copy()
    if flip_row:
        array[0] = 255 - array[0]
    info = PngImagePlugin.PngInfo()
    if texts:
        info.add_text("parameters", params)
        if sdterm_chunk:
            info.add_text("sdterm", meta)
    Image.fromarray(array).save(dst, pnginfo=info)
    return dst


async def test_verify_renders_the_last_image_again_and_says_identical(engine: Held, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "a red fox")
        (name,) = outputs(tmp_path)
        before = (tmp_path / "out" / name).read_bytes()
        history = app.session.history.path.read_text()
        await enter(pilot, "/verify")
        await settle(pilot)
        assert notice(app) == f"verify {name}: identical: every pixel matches"
        assert len(engine.requests) == 2 and engine.requests[1] == engine.requests[0]  # the same request again
        assert outputs(tmp_path) == [name] and (tmp_path / "out" / name).read_bytes() == before
        assert app.session.history.path.read_text() == history  # not a render of the session


async def test_verify_of_an_altered_or_edited_image_says_different_and_what_differs(engine: Held, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "a red fox")
        (name,) = outputs(tmp_path)
        src = tmp_path / "out" / name
        altered = copy_png(src, tmp_path / "altered.png", flip_row=True)
        await enter(pilot, f"/verify {altered}")
        await settle(pilot)
        assert notice(app).startswith("verify altered.png: different: max diff ")
        assert error_styled(app.query_one("#notice"))
        with Image.open(src) as im:
            meta = json.loads(im.text["sdterm"])
        meta["stamp"]["torch"] = "1.13.1"
        edited = tmp_path / "edited.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", Image.open(src).text["parameters"])
        info.add_text("sdterm", json.dumps(meta))
        Image.open(src).save(edited, pnginfo=info)
        await enter(pilot, f"/verify {edited}")
        await settle(pilot)
        assert notice(app) == "verify edited.png: identical: every pixel matches · differs here: torch version"
        a1111 = copy_png(src, tmp_path / "[red]a1111.png", sdterm_chunk=False)  # brackets: text, not markup
        await enter(pilot, f"/verify {a1111}")
        await settle(pilot)
        assert notice(app) == ("verify [red]a1111.png: identical: every pixel matches · no stamp in the image "
                               "(rendered from its parameters)")


async def test_verify_bad_input_is_one_line_and_a_render_waits_for_it(engine: Held, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/verify")
        assert notice(app) == "/verify: no image yet: render one, or /verify IMAGE.png"
        await render(pilot, "a red fox")
        (name,) = outputs(tmp_path)
        bare = copy_png(tmp_path / "out" / name, tmp_path / "bare.png", texts=False)
        await enter(pilot, f"/verify {bare}")
        assert notice(app) == (f"/verify: {bare}: no generation parameters (no 'parameters' or 'sdterm' text in the "
                               "image): nothing to verify")
        assert error_styled(app.query_one("#notice")) and len(engine.requests) == 1

        engine.hold()  # /verify is a render: a prompt entered meanwhile queues behind it
        await enter(pilot, "/verify")
        await held_reached(pilot, engine)
        assert app.busy
        await enter(pilot, "a castle")
        assert notice(app).startswith("queued seed ")
        engine.release()
        await settle(pilot)
        assert [r.prompt for r in engine.requests] == ["a red fox", "a red fox", "a castle"]
        assert len(outputs(tmp_path)) == 2  # the castle's; the verify wrote nothing


async def test_escape_cancels_a_verify(engine: Held, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "a red fox")
        engine.hold()
        await enter(pilot, "/verify")
        await held_reached(pilot, engine)
        await pilot.press("escape")
        engine.release()
        await settle(pilot)
        assert engine.outcomes[-1] == "cancelled" and notice(app).startswith("cancelled")
        assert not app.busy and len(outputs(tmp_path)) == 1
