"""Init image for img2img, prepared the way A1111 prepares it (issue 16 groundwork, not yet wired in).

What A1111 (v1.6+, UI path) does to an uploaded init image, and what this module repeats:
1. Gradio decodes the upload with ``ImageOps.exif_transpose`` (orientation tag applied, tag dropped) and converts it
   to the ``gr.Image(image_mode="RGBA")`` mode, RGBA.  ``images.fix_image`` then repeats exif_transpose (a no-op by
   now) and ``fix_png_transparency`` (a no-op for RGBA).
2. ``StableDiffusionProcessingImg2Img.init``: ``Init image hash`` = ``hashlib.md5(img.tobytes()).hexdigest()`` of
   that image (before flatten and resize), then ``images.flatten(img, "#ffffff")``: paste onto a white RGBA
   background with its own alpha as the mask, ``convert("RGB")``.
3. ``images.resize_image(mode, img, width, height)`` with one PIL LANCZOS resize (no upscaler): see ``_resize``.
4. ``np.array(img).astype(float32) / 255``, CHW, then ``* 2 - 1`` before the VAE encode.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..params import RESIZE_MODES
BACKGROUND = "#ffffff"  # A1111 opts.img2img_background_color default
MAX_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default (a 0.25 GiB 24-bit image)


class InitImageError(ValueError):
    """An init image that can't be used; str() is one line naming the file and what to do."""


@dataclass(frozen=True)
class InitImage:
    image: Image.Image          # RGB, width x height, what the VAE encoder will see
    tensor: torch.Tensor        # (1, 3, H, W) float32 in [-1, 1]
    source_size: tuple[int, int]  # (width, height) after EXIF orientation, before resize
    mode: str                   # one of RESIZE_MODES
    md5: str                    # A1111 "Init image hash"


def resize_mode(value) -> str:
    """A resize mode by A1111's name (any case) or API integer 0/1/2 -> its name in RESIZE_MODES."""
    if isinstance(value, bool):
        value = None  # True/False are ints to Python, not modes
    elif isinstance(value, int) and 0 <= value < len(RESIZE_MODES):
        return RESIZE_MODES[value]
    elif isinstance(value, str):
        text = " ".join(value.strip().lower().replace("-", " ").replace("_", " ").split())
        if text in RESIZE_MODES:
            return text
        if text.isdigit() and int(text) < len(RESIZE_MODES):
            return RESIZE_MODES[int(text)]
    names = ", ".join(f"{i} {n!r}" for i, n in enumerate(RESIZE_MODES))
    raise ValueError(f"unknown resize mode {value!r}; use one of: {names}")


def _fail(path, what: str) -> InitImageError:
    return InitImageError(f"init image {os.fspath(path)}: {what}")


def _open(path) -> Image.Image:
    """Open and fully decode the first frame, or raise InitImageError (one line)."""
    fix = "give a PNG, JPEG or WebP image file"
    if not os.path.exists(path):
        raise _fail(path, "no such file; check the path")
    if os.path.isdir(path):
        raise _fail(path, f"is a directory; {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below refuses these
            with Image.open(path) as src:
                w, h = src.size
                if w <= 0 or h <= 0:
                    raise _fail(path, f"has an empty size {w}x{h}; {fix}")
                if w * h > MAX_PIXELS:
                    raise _fail(path, f"is {w}x{h} ({w * h:,} pixels), over the {MAX_PIXELS:,}-pixel limit for "
                                      "decompression bombs; downscale it first")
                src.seek(0)  # animated GIF/WebP/APNG: the first frame, as A1111/Gradio get it
                src.load()
                im = src.copy()  # keeps .info (EXIF, palette transparency); the file is closed on return
    except InitImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own refusal, at twice its limit, inside Image.open
        raise _fail(path, f"is too large to decode safely (over {MAX_PIXELS:,} pixels); downscale it first") from None
    except PermissionError:
        raise _fail(path, "can't be read (permission denied); check its permissions") from None
    except Image.UnidentifiedImageError:
        size = os.path.getsize(path)
        what = "is empty (0 bytes)" if size == 0 else "is not an image PIL can read"
        raise _fail(path, f"{what}; {fix}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise _fail(path, f"can't be decoded ({detail}); the file may be truncated or corrupt, re-export it") from None
    return im


def _resize(im: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    """A1111 modules/images.py resize_image, modes 0/1/2, without an upscaler (one LANCZOS resize)."""
    lanczos = Image.Resampling.LANCZOS
    if mode == "just resize":
        return im.resize((width, height), resample=lanczos)
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == "crop and resize":
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = im.resize((src_w, src_h), resample=lanczos)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    # "resize and fill": contain, centre, then stretch the edge line over the bands. The band resizes pass no
    # resample argument in A1111, so PIL's default (BICUBIC) samples a zero-height/width box at the image edge.
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=lanczos)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1], as A1111: uint8 / 255 (float32), then * 2 - 1."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    x = data.reshape(image.height, image.width, 3).permute(2, 0, 1).to(torch.float32) / 255
    return (x * 2 - 1).unsqueeze(0).contiguous()


def prepare_init_image(path, width: int, height: int, mode="just resize") -> InitImage:
    """Open, orient, hash, flatten and resize an init image to width x height as A1111's img2img does."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8:
            raise ValueError(f"init image {name} must be a positive multiple of 8, got {v!r}")
    mode = resize_mode(mode)
    im = _open(path)
    try:
        im = ImageOps.exif_transpose(im)  # Gradio's decode_base64_to_image; A1111's fix_image ignores failures too
    except Exception:  # noqa: BLE001, S110 - a broken EXIF block leaves the image as stored, as in A1111
        pass
    try:
        im = im.convert("RGBA")  # gr.Image(image_mode="RGBA")
    except (OSError, ValueError) as e:
        raise _fail(path, f"has pixel mode {im.mode} that can't be converted to RGB ({e}); re-export as 8-bit RGB") from None
    md5 = hashlib.md5(im.tobytes()).hexdigest()
    background = Image.new("RGBA", im.size, BACKGROUND)  # images.flatten
    background.paste(im, mask=im)
    flat = background.convert("RGB")
    out = _resize(flat, mode, width, height)
    return InitImage(image=out, tensor=to_tensor(out), source_size=flat.size, mode=mode, md5=md5)


def prepare(req) -> InitImage:
    """The init image of a render's parameters (``init_image``, ``width``, ``height``,
    ``resize_mode``), ``~`` expanded; :class:`InitImageError` (one line) when it can't be used."""
    return prepare_init_image(Path(req.init_image).expanduser(), req.width, req.height, req.resize_mode)
