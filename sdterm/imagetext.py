"""The texts an image file carries where generation parameters live: PNG text chunks
(``parameters``, A1111's infotext; ``sdterm``, sdterm's JSON), also after the pixel data, and the
EXIF UserComment of A1111's JPEG/WebP. What the texts mean is :mod:`sdterm.pngmeta`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image


class MetadataError(ValueError):
    """No usable generation parameters; the message is one line naming the file (or the text)."""


MAX_DECODE_PIXELS = 64 * 2**20
"""Text chunks after the pixel data are read only from images up to this size (Pillow decodes them)."""

EXIF_IFD, USER_COMMENT = 0x8769, 0x9286


def one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _user_comment(data: Any) -> str | None:
    """EXIF UserComment: an 8-byte charset header, then the text (A1111 writes UNICODE, UTF-16 BE)."""
    if isinstance(data, str):
        return data
    if not isinstance(data, bytes) or len(data) < 8:
        return None
    head, body = data[:8], data[8:]
    if head.startswith(b"UNICODE"):
        if body.startswith((b"\xfe\xff", b"\xff\xfe")):
            return body.decode("utf-16", "replace")
        # Big-endian unless the zero bytes sit at the odd offsets (ASCII text in little-endian).
        little = body[1::2].count(0) > body[0::2].count(0)
        return body.decode("utf-16-le" if little else "utf-16-be", "replace")
    if head.startswith(b"ASCII"):
        return body.decode("ascii", "replace")
    return body.decode("utf-8", "replace")


def image_texts(path: Path) -> dict[str, str]:
    """The 'parameters' and 'sdterm' texts of the image at ``path``; MetadataError when unreadable."""
    import warnings

    where = one_line(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                info = img.info
                out = {k: info[k] for k in ("parameters", "sdterm") if isinstance(info.get(k), str)}
                if not out and img.format == "PNG" and img.width * img.height <= MAX_DECODE_PIXELS:
                    try:  # text chunks after IDAT: Pillow finds them by reading to the end
                        text = img.text
                    except Exception:
                        text = {}
                    out = {k: text[k] for k in ("parameters", "sdterm") if isinstance(text.get(k), str)}
                if not out and img.format in ("JPEG", "WEBP", "MPO", "TIFF"):
                    comment = _user_comment(img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT))
                    if comment and comment.strip("\0 "):
                        out["parameters"] = comment.rstrip("\0")
    except FileNotFoundError:
        raise MetadataError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise MetadataError(f"{where}: is a folder, not an image") from None
    except OSError as exc:
        if getattr(exc, "strerror", None):
            raise MetadataError(f"{where}: cannot read it ({exc.strerror})") from None
        raise MetadataError(f"{where}: not an image sdterm can read") from None
    except Exception as exc:  # Pillow raises many types (SyntaxError, ValueError...) for broken files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetadataError(f"{where}: not a readable image ({one_line(detail)})") from None
    return out
