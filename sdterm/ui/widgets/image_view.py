"""The finished image, through textual-image (Kitty graphics, Sixel, half-block cells), or the
renders of a batch as a contact sheet (one composed picture, see ``contact_sheet``) where the arrow
keys pick one."""

from __future__ import annotations

import time

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Static

from ..text import plain
from .contact_sheet import Sheet, compose_sheet

PROTOCOLS = ("auto", "kitty", "sixel", "halfcell", "unicode")
PREVIEW_BUDGET = 100_000
"""Bytes a second that preview frames may take over Sixel or Kitty graphics (a frame waits until
the previous one's bytes fit in it): an SSH link at 1 Mbit/s still has room for typing."""
PREVIEW_FPS = 8
"""The most preview frames a second, whatever the protocol (half-block cells cost no more)."""
clock = time.monotonic
"""The preview throttle's clock (tests replace it)."""
LATENT_SCALE = 8
"""A preview the size of the latent is 1/8 of the image's width and height."""


def image_widget_class(protocol: str):
    """The picture widget for ``protocol``: 'auto' takes what :func:`sdterm.ui.terminal.prepare_graphics`
    detected (textual-image's own detection where that never ran, as in tests); Sixel and Kitty
    pictures are sdterm's (:mod:`.picture`: each picture travels once)."""
    from textual_image import widget

    from ..terminal import detected_protocol
    from .picture import KittyPicture, SixelPicture

    if protocol == "auto":
        protocol = detected_protocol() or _library_choice()
    return {
        "kitty": KittyPicture,
        "sixel": SixelPicture,
        "halfcell": widget.HalfcellImage,
        "unicode": widget.UnicodeImage,
    }[protocol]


def _library_choice() -> str:
    """What textual-image's own detection (run when it was first imported) picked."""
    from textual_image import renderable as r

    return {r.SixelImage: "sixel", r.TGPImage: "kitty", r.HalfcellImage: "halfcell"}.get(r.Image, "unicode")


class ImageView(Vertical, can_focus=True):
    """Focusable: the seed/variation keys are bound here so typing in the prompt is never hijacked.

    Two modes: one image (:meth:`show`; Enter posts :class:`RerenderRequested`) and a contact sheet
    (:meth:`show_sheet`, :meth:`add_to_sheet`; the arrow keys move the selection, Enter posts
    :class:`Picked`). Escape is not bound here: the app uses it to cancel.
    """

    BINDINGS = [
        # One footer entry for both seed keys ("[ ] seed±1"): room for Enter's at 120 columns.
        Binding("right_square_bracket", "app.nudge(1)", "seed±1", key_display="[ ]"),
        Binding("left_square_bracket", "app.nudge(-1)", "seed−1", show=False),
        Binding("r", "app.reroll", "new seed"),
        Binding("l", "app.lock", "lock seed"),
        Binding("s", "app.pick_sampler", "sampler", show=False),  # the footer is full at 120 columns; F1 lists it
        Binding("v", "app.variation(1)", "var+"),
        Binding("V", "app.variation(-1)", "var−"),
        Binding("d", "app.draft", "draft", show=False),  # F2 anywhere
        Binding("f", "app.full_quality", "full quality", show=False),  # F3 anywhere
        Binding("i", "app.refine", "img2img", show=False),
        Binding("enter", "rerender", "again"),
        Binding("enter", "pick", "pick"),
        Binding("left", "move(-1, 0)", "◀", show=False),
        Binding("right", "move(1, 0)", "▶", show=False),
        Binding("up", "move(0, -1)", "▲", show=False),
        Binding("down", "move(0, 1)", "▼", show=False),
    ]

    DEFAULT_CSS = """
    ImageView { height: 1fr; border: round $panel; }
    ImageView:focus { border: round $accent; }
    ImageView #caption { height: auto; color: $text-muted; }
    ImageView #banner { height: auto; color: $warning; text-style: bold; }
    ImageView #picture { height: 1fr; width: auto; }
    """

    class Picked(Message):
        """Enter on a contact sheet: keep working on render ``index`` (0-based, in sheet order)."""

        def __init__(self, image_view: ImageView, index: int) -> None:
            super().__init__()
            self.image_view = image_view
            self.index = index

        @property
        def control(self) -> ImageView:
            return self.image_view

    class RerenderRequested(Message):
        """Enter on a single image: render again with the current settings."""

        def __init__(self, image_view: ImageView) -> None:
            super().__init__()
            self.image_view = image_view

        @property
        def control(self) -> ImageView:
            return self.image_view

    def __init__(self, protocol: str = "auto", banner: str = "", **kw) -> None:
        super().__init__(**kw)
        self.protocol = protocol
        self.banner = banner
        self._sheet_images: list[PILImage.Image] | None = None
        """The sheet's renders, in order; None in single-image mode."""
        self._sheet_captions: list[str] = []
        self._selected = 0
        self.sheet: Sheet | None = None
        """The composed sheet on screen (its picture, grid and boxes); None in single-image mode."""
        self._sheet_area = (0, 0)
        self._thumbnails: dict = {}
        """compose_sheet's thumbnails of the sheet's renders (by id: cleared with the sheet)."""
        self._preview_at: float | None = None
        """When the last preview frame was drawn (None: no preview on screen)."""
        self._preview_caption = ""

    def compose(self) -> ComposeResult:
        yield Static(plain(self.banner), id="banner")
        yield image_widget_class(self.protocol)(None, id="picture")
        yield Static(plain("no image yet: type a prompt and press Enter"), id="caption")

    # ---- single image ------------------------------------------------------------------------

    def show(self, image: PILImage.Image, caption: str) -> None:
        """One image, big; leaves sheet mode."""
        self._preview_at = None
        self._show(image, caption)

    def _show(self, image: PILImage.Image, caption: str) -> None:
        was_sheet = self.in_sheet
        self._sheet_images, self._sheet_captions, self._selected, self.sheet = None, [], 0, None
        self._thumbnails = {}
        self.query_one("#picture").image = image
        self.query_one("#caption", Static).update(plain(caption))
        if was_sheet:
            self.refresh_bindings()

    # ---- live preview ------------------------------------------------------------------------

    def show_preview(self, image: PILImage.Image, caption: str, size: tuple[int, int] | None = None) -> bool:
        """A preview frame of the render under way (e.g. the 64×64 latent as RGB for 512×512),
        scaled up (nearest) to ``size``, the render's size (default: 8 times the frame's), so the
        picture keeps its place and size when the final image replaces it through :meth:`show`.
        Returns False, drawing nothing, while the traffic budget says wait: at most
        :data:`PREVIEW_FPS` frames a second, and with Sixel or Kitty graphics no more than
        :data:`PREVIEW_BUDGET` bytes a second (judged by the last picture's size)."""
        now = clock()
        if self._preview_at is not None:
            interval = 1 / PREVIEW_FPS
            counter = getattr(self.query_one("#picture"), "counter", None)
            if counter is not None:
                interval = max(interval, counter.last_bytes / PREVIEW_BUDGET)
            if now - self._preview_at < interval:
                return False
        width, height = size or (image.width * LATENT_SCALE, image.height * LATENT_SCALE)
        frame = image.convert("RGB").resize((max(1, width), max(1, height)), PILImage.Resampling.NEAREST)
        self._preview_at, self._preview_caption = now, caption
        self._show(frame, caption)
        return True

    @property
    def previewing(self) -> bool:
        """True while a preview frame (not a finished image) is on screen."""
        return self._preview_at is not None

    def preview_cancelled(self, caption: str | None = None) -> None:
        """The render was cancelled: the last preview frame stays, its caption says "cancelled"."""
        if self._preview_at is None:
            return
        self._preview_caption = f"{caption or self._preview_caption} · cancelled"
        self.query_one("#caption", Static).update(plain(self._preview_caption))

    # ---- contact sheet -----------------------------------------------------------------------

    @property
    def in_sheet(self) -> bool:
        """True while a contact sheet is shown."""
        return self._sheet_images is not None

    @property
    def selected(self) -> int:
        """The selected render's index on the sheet (0 in single-image mode)."""
        return self._selected

    @property
    def sheet_count(self) -> int:
        """How many renders the sheet holds (0 in single-image mode)."""
        return len(self._sheet_images or ())

    def show_sheet(self, images: list[PILImage.Image], captions: list[str], selected: int = 0) -> None:
        """A contact sheet of ``images`` (``captions[i]`` describes ``images[i]``, e.g. "seed 1235 ·
        512×512 · 3.1s"), ``selected`` framed. An empty list starts an empty sheet that
        :meth:`add_to_sheet` fills."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        was_sheet = self.in_sheet
        self._sheet_images, self._sheet_captions = list(images), list(captions)
        self._thumbnails = {}
        self._selected = max(0, min(selected, len(images) - 1))
        self._redraw()
        if not was_sheet:
            self.refresh_bindings()

    def add_to_sheet(self, image: PILImage.Image, caption: str) -> None:
        """One more render on the sheet (a batch arrives one by one); the selection stays. Outside
        sheet mode this starts a sheet with ``image`` alone."""
        if not self.in_sheet:
            self.show_sheet([image], [caption])
            return
        self._sheet_images.append(image)
        self._sheet_captions.append(caption)
        self._redraw()

    def select(self, index: int) -> None:
        """Frame render ``index`` (clamped to the sheet)."""
        if not self.in_sheet or not self._sheet_images:
            return
        index = max(0, min(index, len(self._sheet_images) - 1))
        if index != self._selected:
            self._selected = index
            self._redraw()

    def _area(self) -> tuple[int, int]:
        """The cells the picture can use: the view's content less the banner and caption lines."""
        width, height = self.content_size
        for child in ("#banner", "#caption"):
            height -= self.query_one(child).outer_size.height
        return max(0, width), max(0, height)

    def _redraw(self) -> None:
        images = self._sheet_images or []
        caption = self.query_one("#caption", Static)
        if not images:
            self.sheet = None
            self.query_one("#picture").image = None
            caption.update(plain("batch: waiting for the first image…"))
            return
        self._sheet_area = self._area()
        self.sheet = compose_sheet(images, self._selected, self._sheet_area, thumbnails=self._thumbnails)
        self.query_one("#picture").image = self.sheet.image
        index = self._selected
        caption.update(plain(f"{index + 1}/{len(images)} · {self._sheet_captions[index]} · "
                             "← → pick · Enter keeps working on it"))

    def on_resize(self) -> None:
        """A new size may call for another grid and frame (the terminal was resized, zoom)."""
        if self.sheet is not None and self._area() != self._sheet_area:
            self._thumbnails.clear()  # the tiles' size changes with the area
            self._redraw()

    # ---- keys --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("pick", "move"):
            return self.in_sheet and bool(self._sheet_images)
        if action == "rerender":
            return not self.in_sheet
        return True

    def action_move(self, dx: int, dy: int) -> None:
        """← → go through the batch in order (row to row); ↑ ↓ go a row up or down, to the last
        render when the row below is short, and nowhere past the top or bottom row."""
        if self.sheet is None:
            return
        index, columns, last = self._selected, self.sheet.columns, self.sheet_count - 1
        if dy < 0:
            index = index - columns if index >= columns else index
        elif dy > 0:
            index = min(index + columns, last) if index // columns < last // columns else index
        self.select(index + dx)

    def action_pick(self) -> None:
        self.post_message(self.Picked(self, self._selected))

    def action_rerender(self) -> None:
        self.post_message(self.RerenderRequested(self))
