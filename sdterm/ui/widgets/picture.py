"""The picture widgets behind the image view: textual-image's, changed so that a picture travels to
the terminal once.

Textual asks a widget for its lines again on every full repaint (any layout change: a caption, a
notice, the stage panel), and textual-image's widgets answer each time with the whole image: a
Sixel picture is encoded from its cache but written again (three times per finished render, ~240 KB
each over SSH), and a Kitty picture is transmitted under a new id whenever the widget renders.

- :class:`SixelPicture` writes the Sixel data only when the picture, its place or size, the cell
  size, the background or the terminal size changed, or something may have drawn over it (another
  screen came and went, the app was suspended); other repaints get lines that only move the cursor
  over the picture's cells, so the terminal keeps the pixels. Its last line also leaves the cursor on
  the picture's bottom row, not the row below (textual-image issue #146, fixed upstream in PR #147
  but in no release up to 0.13.2): the row under the picture was left stale after a popup closed.
- :class:`KittyPicture` keeps its renderable (and so the image id the terminal holds) while the
  picture and its size stay; the Unicode placeholders are plain text that Textual redraws for free.

Both count their sends (:attr:`sends`) and the bytes of the last one (:attr:`last_bytes`): the image
view's preview throttle budgets with them.
"""

from __future__ import annotations

from rich.control import Control
from rich.segment import ControlType, Segment
from rich.style import Style
from textual.dom import NoScreen
from textual.geometry import Region
from textual.strip import Strip
from textual_image._pixeldata import PixelData
from textual_image._terminal import get_cell_size
from textual_image.renderable import tgp
from textual_image.renderable.tgp import Image as TGPRenderable
from textual_image.widget._base import Image as BaseImage
from textual_image.widget.sixel import Image as SixelImage
from textual_image.widget.sixel import _CachedSixels, _ImageSixelImpl, _NoopRenderable

SETTLE = 0.03
"""Seconds a new picture or size waits before it is sent: a finished render changes the caption,
and the first layout pass sizes the picture on the height it had before (one send at 52 columns, the
next at 50); the pass after that has the final size."""
_NO_STYLE = Style()
_ZERO_WIDTH = ((ControlType.CURSOR_FORWARD, 0),)
"""Marks a segment as a control: no cells, never cut by the compositor (as textual-image does)."""


def _control(text: str) -> Segment:
    return Segment(text, _NO_STYLE, _ZERO_WIDTH)


class SendCounter:
    """How often a picture widget wrote its image, and the size of the last write."""

    sends = 0
    last_bytes = 0

    def count(self, size: int) -> None:
        self.sends += 1
        self.last_bytes = size


class _SixelOnce(_ImageSixelImpl):
    """textual-image's Sixel painter, writing the Sixel data once per picture and place."""

    def __init__(self, image, sixel_options=None, counter: SendCounter | None = None) -> None:
        super().__init__(image, sixel_options)
        self.counter = counter or SendCounter()
        self._sent: tuple | None = None
        self._seen: tuple | None = None
        self._damage = 0

    def on_mount(self) -> None:
        self.app.screen_change_signal.subscribe(self, self.damaged)
        self.app.app_resume_signal.subscribe(self, self.damaged)

    def damaged(self, _=None) -> None:
        """Something may have drawn over the picture: write it again on the next repaint."""
        self._damage += 1

    def render_lines(self, crop: Region) -> list[Strip]:
        try:
            if not self.image or not self.screen.is_active:
                self._damage += 1  # another screen is in front: it draws over the cells
                return []
        except NoScreen:
            return []
        cells = get_cell_size()
        background = self._get_background_rgba()
        region = self.screen.find_widget(self).region
        key = (id(self.image), crop, self.content_size, region, cells, self._sixel_options, background,
               self.app.size, self._damage)
        left, right = region.x + crop.x, region.x + crop.right
        rows = range(region.y + crop.y, region.y + crop.bottom)
        # Every line leaves the cursor where Textual expects the next widget to start: after the
        # picture's cells on that row, none of them written.
        lines = [Strip([_control(Control.move_to(right, y).segment.text)], cell_length=crop.width) for y in rows]
        if key == self._sent or not lines:
            return lines
        if key != self._seen:  # new: wait for the layout to settle (see SETTLE)
            self._seen = key
            self.set_timer(SETTLE, self.refresh)
            return lines
        cached = self._cached_sixels
        if cached and cached.is_hit(self.image, crop, self.content_size, cells, self._sixel_options, background):
            data = cached.sixel_data
        else:
            pixels = self._crop_image(self._scale_image(PixelData(self.image), cells), crop, cells)
            data = self._image_to_sixels(pixels.pil_image, self._sixel_options, background)
            self._cached_sixels = _CachedSixels(
                self.image, crop, self.content_size, cells, self._sixel_options, background, data)
        last = rows[-1]
        lines[-1] = Strip([_control(Control.move_to(left, rows[0]).segment.text), _control(data),
                           _control(Control.move_to(right, last).segment.text)], cell_length=crop.width)
        self._sent = key
        self.counter.count(len(data))
        return lines


class SixelPicture(SixelImage, Renderable=_NoopRenderable):
    """textual-image's Sixel widget with :class:`_SixelOnce` painting it."""

    def __init__(self, image=None, **kw) -> None:
        self.counter = SendCounter()
        super().__init__(image, **kw)

    def compose(self):
        yield _SixelOnce(self.image, self._sixel_options, self.counter)


class _KittyRenderable(TGPRenderable):
    """textual-image's Kitty renderable, counting the bytes it transmits."""

    counter: SendCounter | None = None

    def _send_image_to_terminal(self, width: int, height: int) -> None:
        """textual-image's, counted: the image as PNG in base64, in chunks of 4096 bytes."""
        self.terminal_image_id = next(TGPRenderable._image_id_counter)
        data = self._image_data.scaled(width, height).to_base64()
        if self.counter is not None:
            self.counter.count(len(data))
        while data:
            chunk, data = data[:4096], data[4096:]
            tgp._send_tgp_message(i=self.terminal_image_id, m=1 if data else 0, f=100, payload=chunk, q=2)


class KittyPicture(BaseImage, Renderable=_KittyRenderable):
    """Kitty graphics (Unicode placeholders): one transmission per picture and size."""

    def __init__(self, image=None, **kw) -> None:
        self.counter = SendCounter()
        self._kept: tuple | None = None
        self._seen: tuple | None = None
        super().__init__(image, **kw)

    def render(self):
        if not self._image:
            return ""
        key = (id(self._image), self._get_styled_size(), self.content_size, get_cell_size())
        if self._renderable is not None and key == self._kept:
            return self._renderable
        if key != self._seen:  # new: wait for the layout to settle (see SETTLE)
            self._seen = key
            self.set_timer(SETTLE, self.refresh)
            return ""
        renderable = super().render()
        renderable.counter = self.counter
        self._kept = key
        return renderable

    def on_unmount(self) -> None:
        if self._renderable is not None:
            self._renderable.cleanup()
            self._renderable = None
