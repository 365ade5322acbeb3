"""The image view's contact sheet (batch renders), driven through Pilot in a small host app with
half-block cells (no terminal detection): the composed picture's grid, the selection frame, the
arrow keys, Enter's messages, and the sheet's size and layout. Then app.tcss on the app's layout
skeleton: the parameter line wraps, and the Screen class "zoomed" gives the image the screen."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from textual.app import App, ComposeResult
from textual.containers import Horizontal, Vertical
from textual.geometry import Region
from textual.widgets import Footer, Input, Static

import sdterm.ui
from sdterm.ui.text import plain
from sdterm.ui.widgets.contact_sheet import BACKGROUND, FRAME, compose_sheet, pick_columns
from sdterm.ui.widgets.image_view import ImageView

COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 230), (240, 240, 240)]
SIZE = (100, 30)


class Host(App):
    """An ImageView alone, focused; it records the messages the view posts."""

    def __init__(self) -> None:
        super().__init__()
        self.posted: list[tuple] = []

    def compose(self) -> ComposeResult:
        yield ImageView("halfcell", id="view")

    def on_mount(self) -> None:
        self.query_one(ImageView).focus()

    def on_image_view_picked(self, message: ImageView.Picked) -> None:
        self.posted.append(("picked", message.index))

    def on_image_view_rerender_requested(self, message: ImageView.RerenderRequested) -> None:
        self.posted.append(("rerender",))


def solid(colour, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def captions(n: int) -> list[str]:
    return [f"seed {1234 + i}" for i in range(n)]


def caption_text(app: App) -> str:
    return str(app.query_one("#caption", Static).render())


def frame_probes(sheet, index: int) -> list[tuple[int, int]]:
    """Points in the middle of the frame's band on each side of box ``index``."""
    left, top, right, bottom = sheet.boxes[index]
    off = sheet.gap + sheet.frame // 2 + 1
    mx, my = (left + right) // 2, (top + bottom) // 2
    return [(left - off, my), (right - 1 + off, my), (mx, top - off), (mx, bottom - 1 + off)]


def framed(sheet) -> list[int]:
    """The indexes of the boxes with the frame colour all around them."""
    px = sheet.image.load()
    return [i for i in range(len(sheet.boxes)) if all(px[p] == FRAME for p in frame_probes(sheet, i))]


def assert_grid(sheet, colours) -> None:
    px = sheet.image.load()
    assert len(sheet.boxes) == len(colours)
    for (left, top, right, bottom), colour in zip(sheet.boxes, colours):
        assert px[(left + right) // 2, (top + bottom) // 2] == colour
        assert px[left + 1, top + 1] == colour and px[right - 2, bottom - 2] == colour
    for i in range(len(sheet.boxes)):  # between the boxes: the background, or the frame
        assert all(px[p] in (BACKGROUND, FRAME) for p in frame_probes(sheet, i))


@pytest.mark.asyncio
async def test_sheet_holds_the_images_in_a_grid_with_the_selected_one_framed():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS], captions(4))
        await pilot.pause()
        assert view.in_sheet and view.selected == 0 and view.sheet_count == 4
        sheet = view.sheet
        assert app.query_one("#picture").image is sheet.image
        assert_grid(sheet, COLOURS)
        assert framed(sheet) == [0]
        assert caption_text(app).startswith("1/4 · seed 1234 · ")
        # About 98x26 cells, i.e. 98x52 in pixels (a cell is 1:2): 2x2 shows four squares bigger
        # than a row of 4.
        assert sheet.columns == 2


@pytest.mark.asyncio
async def test_the_sheet_is_laid_out_again_when_the_view_changes_size():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS], captions(4), selected=3)
        await pilot.pause()
        assert view.sheet.columns == 2
        await pilot.resize_terminal(200, 20)  # wide and short (zoom off, say): one row
        await pilot.pause()
        assert view.sheet.columns == 4 and framed(view.sheet) == [3]
        assert app.query_one("#picture").image is view.sheet.image
        assert_grid(view.sheet, COLOURS)


@pytest.mark.asyncio
async def test_the_selection_frame_shows_in_half_block_cells():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(ImageView).show_sheet([solid(c) for c in COLOURS], captions(4), selected=2)
        await pilot.pause()
        svg = app.export_screenshot()
        assert "#{:02x}{:02x}{:02x}".format(*FRAME) in svg.lower()


@pytest.mark.asyncio
async def test_arrow_keys_move_the_frame():
    app = Host()
    async with app.run_test(size=(60, 40)) as pilot:  # narrow and tall: a 2x2 grid
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS], captions(4))
        await pilot.pause()
        assert view.sheet.columns == 2
        await pilot.press("right")
        assert view.selected == 1 and framed(view.sheet) == [1]
        assert_grid(view.sheet, COLOURS)
        assert caption_text(app).startswith("2/4 · seed 1235 · ")
        await pilot.press("down")
        assert view.selected == 3 and framed(view.sheet) == [3]
        await pilot.press("right", "down")  # the last one: stays
        assert view.selected == 3
        await pilot.press("left")  # ← → go through the batch in order, row to row
        assert view.selected == 2 and framed(view.sheet) == [2]
        await pilot.press("left")
        assert view.selected == 1
        await pilot.press("up")  # the top row: stays
        assert view.selected == 1
        await pilot.press("left", "left")  # the first one: stays
        assert view.selected == 0 and framed(view.sheet) == [0]
        assert app.posted == []


@pytest.mark.asyncio
async def test_down_from_above_a_short_row_goes_to_the_last_render():
    app = Host()
    async with app.run_test(size=(60, 40)) as pilot:
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS[:3]], captions(3), selected=1)
        await pilot.pause()
        assert view.sheet.columns == 2 and framed(view.sheet) == [1]
        await pilot.press("down")
        assert view.selected == 2 and framed(view.sheet) == [2]
        await pilot.press("down")
        assert view.selected == 2


@pytest.mark.asyncio
async def test_enter_on_the_sheet_posts_picked_with_the_selection():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS], captions(4))
        await pilot.pause()
        await pilot.press("right", "enter")
        await pilot.pause()
        assert app.posted == [("picked", 1)]


@pytest.mark.asyncio
async def test_add_to_sheet_grows_it_and_keeps_the_selection():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ImageView)
        view.add_to_sheet(solid(COLOURS[0]), "seed 1234")  # the first of a batch starts the sheet
        await pilot.pause()
        assert view.in_sheet and view.sheet_count == 1
        assert_grid(view.sheet, COLOURS[:1])
        view.add_to_sheet(solid(COLOURS[1]), "seed 1235")
        await pilot.press("right")
        for colour, caption in zip(COLOURS[2:], captions(4)[2:]):
            view.add_to_sheet(solid(colour), caption)
        await pilot.pause()
        assert view.sheet_count == 4 and view.selected == 1
        assert_grid(view.sheet, COLOURS)
        assert framed(view.sheet) == [1]
        assert caption_text(app).startswith("2/4 · seed 1235 · ")


@pytest.mark.asyncio
async def test_show_leaves_sheet_mode_and_enter_asks_for_a_rerender():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS], captions(4))
        await pilot.pause()
        single = solid((10, 120, 120), (96, 64))
        view.show(single, "seed 99")
        await pilot.pause()
        assert not view.in_sheet and view.sheet is None
        assert app.query_one("#picture").image is single
        assert caption_text(app) == "seed 99"
        await pilot.press("right", "enter")
        await pilot.pause()
        assert app.posted == [("rerender",)]
        assert view.selected == 0


@pytest.mark.asyncio
async def test_captions_are_never_markup():
    app = Host()
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ImageView)
        view.show_sheet([solid(c) for c in COLOURS[:2]], ["a fox in [snow]", "[/snow] (red:1.3)"])
        await pilot.press("right")
        assert "[/snow] (red:1.3)" in caption_text(app)
        view.show(solid(COLOURS[0]), "a fox in [snow]")
        await pilot.pause()
        assert caption_text(app) == "a fox in [snow]"


def test_the_sheet_stays_small_for_big_renders():
    images = [solid(c, (768, 512)) for c in COLOURS * 2]
    sheet = compose_sheet(images, 5, (120, 30))
    assert max(sheet.image.size) <= 1024  # Kitty/Sixel traffic stays small
    assert max(sheet.image.size) > 900  # but the thumbnails are not needlessly tiny
    assert_grid(sheet, COLOURS * 2)
    assert framed(sheet) == [5]


def test_small_renders_are_not_enlarged():
    sheet = compose_sheet([solid(c, (64, 48)) for c in COLOURS], 0, (200, 60))
    assert all((r - left, b - t) == (64, 48) for left, t, r, b in sheet.boxes)


def test_thumbnails_are_kept_between_calls_and_follow_the_tile_size():
    images = [solid(c, (512, 512)) for c in COLOURS]
    kept: dict = {}
    big = compose_sheet(images, 0, (200, 60), thumbnails=kept)
    assert len(kept) == 4
    again = compose_sheet(images, 2, (200, 60), thumbnails=kept)  # a move: nothing resized again
    assert len(kept) == 4 and again.boxes == big.boxes and framed(again) == [2]
    small = compose_sheet(images, 1, (40, 12), thumbnails=kept)  # a smaller panel: smaller tiles
    assert small.boxes[0][2] - small.boxes[0][0] < big.boxes[0][2] - big.boxes[0][0]
    assert_grid(small, COLOURS)
    assert framed(small) == [1]


def test_columns_follow_the_panel_shape():
    square = (512, 512)
    assert pick_columns(4, square, (160, 20)) == 4  # wide and short: one row
    assert pick_columns(4, square, (40, 20)) == 2  # 40x40 in pixels: 2x2
    assert pick_columns(4, square, (20, 60)) == 1  # tall: one column
    assert pick_columns(1, square, (0, 0)) == 1
    assert pick_columns(3, (768, 512), (80, 30)) == 2  # 80x60 in pixels: two wide images a row


class Layout(App):
    """The app's layout skeleton (its ids) with the app's stylesheet: what zoom and the wrapped
    parameter line do, apart from the rest of the app."""

    CSS_PATH = str(Path(sdterm.ui.__file__).parent / "app.tcss")

    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            yield Input(id="prompt")
            yield Input(id="negative")
            yield Static(id="params")
        with Horizontal(id="main"):
            yield ImageView("halfcell", id="view")
            yield Static("stages", id="panel")
        yield Static("notice", id="notice")
        yield Footer()


PARAMS = ("seed 1234567890 (locked) · 50 steps · CFG 7.5 · 768×512 · euler_a · eta 0 · var 0.25 of seed 99 · "
          "budget auto (3.50G) · batch 4 · model v1-5-pruned-emaonly [fp16]")


@pytest.mark.asyncio
async def test_the_parameter_line_wraps_at_80_columns():
    app = Layout()
    async with app.run_test(size=(80, 24)) as pilot:
        app.query_one("#params", Static).update(plain(PARAMS))
        await pilot.pause()
        assert 2 <= app.query_one("#params").size.height <= 3
        app.query_one("#params", Static).update(plain("seed 1 · 20 steps"))
        await pilot.pause()
        assert app.query_one("#params").size.height == 1


@pytest.mark.asyncio
async def test_zoom_gives_the_image_the_screen_but_the_notice_and_footer():
    app = Layout()
    async with app.run_test(size=(80, 24)) as pilot:
        view = app.query_one(ImageView)
        before = view.region
        app.screen.add_class("zoomed")
        await pilot.pause()
        assert not app.query_one("#top").display and not app.query_one("#panel").display
        assert app.query_one("#notice").region.height == 1 and app.query_one(Footer).region.height == 1
        assert view.region == Region(0, 0, 80, 22)
        assert view.region.width > before.width and view.region.height > before.height
        app.screen.remove_class("zoomed")
        await pilot.pause()
        assert view.region == before
