"""The finished image, through textual-image (Kitty graphics, Sixel, half-block cells)."""

from __future__ import annotations

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Static

from ..text import plain

PROTOCOLS = ("auto", "kitty", "sixel", "halfcell", "unicode")


def image_widget_class(protocol: str):
    """The textual-image widget for ``protocol`` ('auto' uses textual-image's detection, which
    must run before the app starts: importing this module does that)."""
    from textual_image import widget

    return {
        "auto": widget.Image,
        "kitty": widget.TGPImage,
        "sixel": widget.SixelImage,
        "halfcell": widget.HalfcellImage,
        "unicode": widget.UnicodeImage,
    }[protocol]


class ImageView(Vertical, can_focus=True):
    """Focusable: the seed/variation keys are bound here so typing in the prompt is never hijacked."""

    BINDINGS = [
        Binding("right_square_bracket", "app.nudge(1)", "seed+1"),
        Binding("left_square_bracket", "app.nudge(-1)", "seed−1"),
        Binding("r", "app.reroll", "new seed"),
        Binding("l", "app.lock", "lock seed"),
        Binding("v", "app.variation(1)", "var+"),
        Binding("V", "app.variation(-1)", "var−"),
    ]

    DEFAULT_CSS = """
    ImageView { height: 1fr; border: round $panel; }
    ImageView:focus { border: round $accent; }
    ImageView #caption { height: auto; color: $text-muted; }
    ImageView #banner { height: auto; color: $warning; text-style: bold; }
    ImageView #picture { height: 1fr; width: auto; }
    """

    def __init__(self, protocol: str = "auto", banner: str = "", **kw) -> None:
        super().__init__(**kw)
        self.protocol = protocol
        self.banner = banner

    def compose(self) -> ComposeResult:
        yield Static(plain(self.banner), id="banner")
        yield image_widget_class(self.protocol)(None, id="picture")
        yield Static(plain("no image yet: type a prompt and press Enter"), id="caption")

    def show(self, image: PILImage.Image, caption: str) -> None:
        self.query_one("#picture").image = image
        self.query_one("#caption", Static).update(plain(caption))
