"""Terminal graphics (issue 17): a picture is sent once, the Sixel cursor ends on the picture's
bottom row (textual-image #146), detection after the tmux passthrough and with one DA1-terminated
burst, kitty older than 0.28 falls back, and the image view's live preview frames (throttle, size,
"cancelled"). Pilot in a small host app; the fake terminals are functions."""

from __future__ import annotations

import time

import pytest
from PIL import Image
from rich.control import Control
from textual.app import App, ComposeResult
from textual.geometry import Region
from textual.screen import ModalScreen
from textual.widgets import Static

from sdterm.ui import terminal
from sdterm.ui.terminal import Answers, ask_terminal, choose_protocol, detect_protocol, kitty_version, tmux_wrap
from sdterm.ui.widgets import image_view
from sdterm.ui.widgets.image_view import PREVIEW_BUDGET, ImageView
from sdterm.ui.widgets.picture import _SixelOnce


class Host(App):
    def __init__(self, protocol: str) -> None:
        super().__init__()
        self.protocol = protocol

    def compose(self) -> ComposeResult:
        yield ImageView(self.protocol, id="view")


class Popup(ModalScreen):
    def compose(self) -> ComposeResult:
        yield Static("help")


def picture(app):
    return app.query_one("#picture")


async def settle(pilot) -> None:
    for _ in range(3):
        await pilot.pause(0.06)


@pytest.fixture
def kitty_messages(monkeypatch):
    """Kitty graphics messages, kept instead of written to the real stdout."""
    from textual_image.renderable import tgp

    sent: list[dict] = []
    monkeypatch.setattr(tgp, "_send_tgp_message", lambda *, payload=None, **kw: sent.append(kw))
    return sent


# ---- one send per picture ----------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_sixel_picture_is_sent_once_whatever_else_changes():
    app = Host("sixel")
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(ImageView)
        view.show(Image.new("RGB", (512, 512), (200, 30, 30)), "seed 1 · 512×512 · 1.0s")
        await settle(pilot)
        counter = picture(app).counter
        assert counter.sends == 1 and counter.last_bytes > 0
        view.query_one("#caption", Static).update("seed 1 · saved")  # a layout pass
        view.focus()
        app.notify("a toast")
        app.screen.refresh(layout=True)
        await settle(pilot)
        assert counter.sends == 1
        view.show(Image.new("RGB", (512, 512), (30, 30, 200)), "seed 2")
        await settle(pilot)
        assert counter.sends == 2


@pytest.mark.asyncio
async def test_a_kitty_picture_is_transmitted_once(kitty_messages):
    app = Host("kitty")
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(ImageView)
        view.show(Image.new("RGB", (512, 512), (200, 30, 30)), "seed 1")
        await settle(pilot)
        view.query_one("#caption", Static).update("seed 1 · saved")
        view.focus()
        app.screen.refresh(layout=True)
        picture(app).refresh()
        await settle(pilot)
        ids = {m["i"] for m in kitty_messages if m.get("f") == 100}
        assert len(ids) == 1 and picture(app).counter.sends == 1


@pytest.mark.asyncio
async def test_a_popup_over_a_sixel_picture_has_it_sent_again_on_the_bottom_row():
    """After a popup closes the picture is written again, and its last line leaves the cursor on
    the picture's bottom row, not the row under it (which stayed stale: textual-image #146)."""
    app = Host("sixel")
    async with app.run_test(size=(100, 30)) as pilot:
        app.query_one(ImageView).show(Image.new("RGB", (512, 512), (200, 30, 30)), "seed 1")
        await settle(pilot)
        impl = app.query_one(_SixelOnce)
        app.push_screen(Popup())
        await settle(pilot)
        app.pop_screen()
        await settle(pilot)
        assert picture(app).counter.sends == 2
        impl.damaged()
        crop = Region(0, 0, *impl.size)
        impl.render_lines(crop)  # a new key waits for the layout to settle
        lines = impl.render_lines(crop)
        region = impl.region
        assert picture(app).counter.sends == 3
        assert list(lines[-1])[-1].text == Control.move_to(region.right, region.bottom - 1).segment.text
        for strip in lines[:-1]:  # the other lines write no cell
            assert all(seg.control for seg in strip)


# ---- detection -----------------------------------------------------------------------------------

class FakeTerminal:
    """Answers a burst of queries as a terminal would; ``tmux``: DA1 answered at once by tmux,
    Kitty graphics only when the query came through the passthrough, a few ms later."""

    def __init__(self, *, sixel=False, kitty=False, version="", tmux=False, silent=False) -> None:
        self.sixel, self.kitty, self.version, self.tmux, self.silent = sixel, kitty, version, tmux, silent
        self.pending: list[tuple[float, str]] = []
        self.written = ""

    def write(self, text: str) -> None:
        self.written += text
        if self.silent:
            return
        now = time.monotonic()
        kitty_query = tmux_wrap(terminal.KITTY_QUERY) if self.tmux else terminal.KITTY_QUERY
        if self.kitty and kitty_query in text:
            self.pending.append((now + (0.004 if self.tmux else 0), "\x1b_Gi=31;OK\x1b\\"))
        if self.version and terminal.XTVERSION in text and not self.tmux:
            self.pending.append((now, f"\x1bP>|{self.version}\x1b\\"))
        if terminal.DA1 in text:
            self.pending.append((now, "\x1b[?62;4;22c" if self.sixel else "\x1b[?62;22c"))

    def read(self, seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready = [a for t, a in self.pending if t <= time.monotonic()]
            if ready:
                self.pending = [(t, a) for t, a in self.pending if t > time.monotonic()]
                return "".join(ready)
            time.sleep(0.001)
        return ""


def detect(fake: FakeTerminal, env: dict, monkeypatch, termtype: str = "") -> str:
    monkeypatch.setattr(terminal, "tmux_client_termtype", lambda: termtype)
    return detect_protocol(fake.write, fake.read, env)[0]


def test_inside_tmux_the_kitty_query_goes_through_the_passthrough(monkeypatch):
    tmux = {"TMUX": "/tmp/tmux-0/default,1,0", "TERM": "tmux-256color"}
    fake = FakeTerminal(kitty=True, tmux=True)
    assert detect(fake, tmux, monkeypatch, "kitty(0.35.2)") == "kitty"
    assert tmux_wrap(terminal.KITTY_QUERY) in fake.written
    # A terminal that answers only wrapped queries, asked unwrapped (as textual-image did): nothing.
    assert ask_terminal(fake.write, fake.read, tmux=False, timeout=0.2).kitty is False


def test_outside_tmux_the_answers_before_da1_are_all_there_is(monkeypatch):
    fake = FakeTerminal(kitty=True, version="kitty(0.35.2)")
    start = time.monotonic()
    assert detect(fake, {"TERM": "xterm-kitty"}, monkeypatch) == "kitty"
    assert time.monotonic() - start < 0.5  # DA1 ends the wait, not the 1 s timeout
    assert detect(FakeTerminal(sixel=True), {"TERM": "xterm"}, monkeypatch) == "sixel"
    assert detect(FakeTerminal(), {"TERM": "xterm"}, monkeypatch) == "halfcell"


def test_a_terminal_that_answers_nothing_is_waited_for_the_timeout_once():
    fake = FakeTerminal(silent=True)
    start = time.monotonic()
    answers = ask_terminal(fake.write, fake.read, tmux=False, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 1.0 and not answers.da1
    assert terminal.QUERY_TIMEOUT >= 1.0


@pytest.mark.parametrize("answers, expected", [
    (dict(kitty=True, version="kitty(0.26.5)"), "halfcell"),  # placeholders came with 0.28
    (dict(kitty=True, version="kitty(0.26.5)", sixel=True), "sixel"),
    (dict(kitty=True, version="kitty(0.28.0)"), "kitty"),
    (dict(kitty=True, version="ghostty 1.1.0"), "kitty"),
    (dict(kitty=True), "halfcell"),  # TERM=xterm-kitty and no version: an old kitty
])
def test_kitty_older_than_0_28_falls_back(monkeypatch, answers, expected):
    env = {"TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1"}
    assert detect(FakeTerminal(**answers), env, monkeypatch) == expected


def test_kitty_version_and_the_answers_parsed():
    assert kitty_version("kitty(0.26.5)") == (0, 26, 5) and kitty_version("WezTerm 2024") is None
    answers = Answers("\x1b_Gi=31;OK\x1b\\\x1bP>|kitty(0.26.5)\x1b\\\x1b[6;20;10t\x1b[?62;22c")
    assert answers.kitty and answers.name == "kitty(0.26.5)" and answers.cell == (10, 20) and not answers.sixel
    assert choose_protocol(sixel=False, kitty=True, name="kitty(0.26.5)", env={}) == "halfcell"


# ---- live preview ----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_preview_frames_are_throttled_and_keep_the_final_images_place(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(image_view, "clock", lambda: clock[0])
    app = Host("sixel")
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(ImageView)
        latent = Image.new("RGB", (64, 64), (90, 90, 90))
        assert view.show_preview(latent, "step 1/20") is True
        await settle(pilot)
        counter = picture(app).counter
        assert counter.sends == 1 and view.previewing
        frame_region = picture(app).region
        wait = max(1 / image_view.PREVIEW_FPS, counter.last_bytes / PREVIEW_BUDGET)
        clock[0] += wait * 0.9
        assert view.show_preview(latent, "step 2/20") is False  # over the budget: nothing drawn
        await settle(pilot)
        assert counter.sends == 1 and "step 1/20" in str(view.query_one("#caption", Static).render())
        clock[0] += wait * 0.2
        assert view.show_preview(Image.new("RGB", (64, 64), (10, 90, 200)), "step 3/20") is True
        await settle(pilot)
        assert counter.sends == 2
        view.show(Image.new("RGB", (512, 512), (200, 30, 30)), "seed 1 · 512×512")
        await settle(pilot)
        assert picture(app).region == frame_region and not view.previewing


@pytest.mark.asyncio
async def test_half_block_previews_go_up_to_8_frames_a_second(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(image_view, "clock", lambda: clock[0])
    app = Host("halfcell")
    async with app.run_test(size=(100, 30)):
        view = app.query_one(ImageView)
        latent = Image.new("RGB", (64, 96), (90, 90, 90))
        drawn = 0
        for _ in range(40):  # 2 seconds at 20 frames a second
            drawn += view.show_preview(latent, "step")
            clock[0] += 0.05
        assert drawn == 14  # every third frame: 0.15 s apart (the first 1/8 s is 0.125 s)
        assert picture(app).image.size == (512, 768)


@pytest.mark.asyncio
async def test_a_cancelled_render_leaves_the_last_preview_with_cancelled():
    app = Host("halfcell")
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(ImageView)
        view.preview_cancelled()  # no preview: nothing changes
        assert "cancelled" not in str(view.query_one("#caption", Static).render())
        assert view.show_preview(Image.new("RGB", (64, 64)), "step 7/20 [/bold]")
        frame = picture(app).image
        view.preview_cancelled()
        await pilot.pause()
        assert picture(app).image is frame
        assert str(view.query_one("#caption", Static).render()) == "step 7/20 [/bold] · cancelled"
