"""A contact sheet: the renders of a batch as a grid of thumbnails composed into ONE picture.

One PIL image, so it goes through whichever image protocol the view uses (Kitty, Sixel, half-block
cells) like any single render. The selected thumbnail gets a frame drawn in pixels, in the margin
around it (never over the image), thick enough to cover at least a cell and a half of the screen
so that it shows even in half-block cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image as PILImage
from PIL import ImageDraw

MAX_SIDE = 1024
"""The composed sheet's long side at most, in pixels: keeps Kitty/Sixel traffic small."""
BACKGROUND = (24, 24, 24)
FRAME = (255, 196, 0)
"""The selection frame: amber on the dark background, whatever the images hold."""
DEFAULT_AREA = (80, 20)
"""The area (cells) assumed while the view's size is not known yet."""


@dataclass(frozen=True)
class Sheet:
    image: PILImage.Image
    """The composed picture."""
    columns: int
    boxes: list[tuple[int, int, int, int]]
    """Each thumbnail's (left, top, right, bottom) in ``image``, in order (right/bottom exclusive)."""
    frame: int
    """The frame's thickness (pixels); it lies just outside the selected box, ``gap`` pixels away."""
    gap: int


def pick_columns(count: int, size: tuple[int, int], area: tuple[int, int]) -> int:
    """The number of columns that shows ``count`` images of ``size`` (pixels) biggest in ``area``
    (cells, width × height; a cell is about twice as tall as it is wide). Ties go to the layout
    with fewer empty slots, then to fewer columns."""
    if count <= 1:
        return 1
    width, height = size
    cells_w, cells_h = area if area[0] > 0 and area[1] > 0 else DEFAULT_AREA
    best, best_key = 1, None
    for columns in range(1, count + 1):
        rows = math.ceil(count / columns)
        # Displayed scale, in half-cells (1 wide, 1 tall) per image pixel.
        scale = min(cells_w / (columns * width), 2 * cells_h / (rows * height))
        key = (round(scale, 9), -(columns * rows - count), -columns)
        if best_key is None or key > best_key:
            best, best_key = columns, key
    return best


def compose_sheet(images: list[PILImage.Image], selected: int, area: tuple[int, int],
                  columns: int | None = None, max_side: int = MAX_SIDE,
                  thumbnails: dict | None = None) -> Sheet:
    """The sheet for ``images`` (at least one) with ``selected`` framed, laid out for ``area``
    (cells, width × height) — or in ``columns`` when given. Each image is fitted, aspect kept,
    into a tile the size of the largest, never enlarged; the whole sheet stays within ``max_side``.

    ``thumbnails``, a dict kept by the caller for as long as ``images`` live, saves the downscaled
    images between calls (moving the selection re-composes the sheet; resizing 8 renders takes
    ~0.1 s, pasting them ~1 ms)."""
    if not images:
        raise ValueError("a contact sheet needs at least one image")
    width = max(image.width for image in images)
    height = max(image.height for image in images)
    count = len(images)
    columns = columns or pick_columns(count, (width, height), area)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    cells_w, cells_h = area if area[0] > 0 and area[1] > 0 else DEFAULT_AREA

    # The frame must cover about a cell and a half on screen, and the screen scale depends on the
    # sheet's size, which depends on the margins: settle it in a few rounds.
    frame, gap = 2, 1
    for _ in range(4):
        margin = frame + gap
        room_w = max_side - columns * 2 * margin
        room_h = max_side - rows * 2 * margin
        k = min(1.0, room_w / (columns * width), room_h / (rows * height))
        tile_w, tile_h = max(4, int(width * k)), max(4, int(height * k))
        sheet_w, sheet_h = columns * (tile_w + 2 * margin), rows * (tile_h + 2 * margin)
        per_cell = max(sheet_w / cells_w, sheet_h / (2 * cells_h))  # sheet pixels per half-cell
        new_frame, new_gap = max(2, math.ceil(1.5 * per_cell)), max(1, math.ceil(0.5 * per_cell))
        if (new_frame, new_gap) == (frame, gap):
            break
        frame, gap = new_frame, new_gap
    margin = frame + gap
    # The last round may have widened the margins: shrink the tiles to keep within max_side.
    k = min(1.0, (max_side - columns * 2 * margin) / (columns * width), (max_side - rows * 2 * margin) / (rows * height))
    tile_w, tile_h = max(4, int(width * k)), max(4, int(height * k))
    sheet_w, sheet_h = columns * (tile_w + 2 * margin), rows * (tile_h + 2 * margin)

    sheet = PILImage.new("RGB", (sheet_w, sheet_h), BACKGROUND)
    boxes = []
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        fit = min(tile_w / image.width, tile_h / image.height)
        size = (max(1, round(image.width * fit)), max(1, round(image.height * fit)))
        key = (id(image), size)
        thumb = thumbnails.get(key) if thumbnails is not None else None
        if thumb is None:
            thumb = image.convert("RGB")
            if size != thumb.size:
                thumb = thumb.resize(size, PILImage.Resampling.LANCZOS, reducing_gap=3.0)
            if thumbnails is not None:
                thumbnails[key] = thumb
        left = column * (tile_w + 2 * margin) + margin + (tile_w - size[0]) // 2
        top = row * (tile_h + 2 * margin) + margin + (tile_h - size[1]) // 2
        sheet.paste(thumb, (left, top))
        boxes.append((left, top, left + size[0], top + size[1]))
    if 0 <= selected < count:
        left, top, right, bottom = boxes[selected]
        ImageDraw.Draw(sheet).rectangle(
            (left - margin, top - margin, right + margin - 1, bottom + margin - 1), outline=FRAME, width=frame)
    return Sheet(sheet, columns, boxes, frame, gap)
