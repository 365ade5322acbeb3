"""Reading generation parameters back out of images: ``sdterm show IMAGE.png``.

Two sources, best first:

* sdterm's own ``sdterm`` PNG text chunk: JSON with the full request (see ``output.png_bytes``),
  checked field by field with the one request validator before it is trusted;
* AUTOMATIC1111's ``parameters`` text (PNG text chunk, or the EXIF UserComment of a JPEG/WebP):
  prompt lines, an optional ``Negative prompt:`` part, and a last line of ``Key: value`` pairs.

The infotext parser never raises on odd text except :class:`MetadataError` when nothing usable is
in it, and its work is linear in the length of the text (no backtracking regex over a whole line).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ConfigError, RenderRequest, validate_request


class MetadataError(ValueError):
    """No usable generation parameters; the message is one line naming the file (or the text)."""


@dataclass(frozen=True)
class ImageParameters:
    """What an image says about how it was made; None where it didn't record a field."""

    source: str
    """'sdterm' (the JSON chunk) or 'a1111' (the parameters text)."""
    prompt: str
    negative: str = ""
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    width: int | None = None
    height: int | None = None
    eta: float | None = None
    subseed: int | None = None
    subseed_strength: float | None = None
    sampler: str | None = None
    model: str | None = None
    """The model's name as recorded (a file stem, not a path)."""
    model_hash: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    """Settings with no field above (A1111's ``Clip skip``, ``Lora hashes``..., sdterm's ``demo``)."""

    def to_request(self) -> RenderRequest:
        """The parameters as a RenderRequest, RenderRequest's defaults where unrecorded (not validated)."""
        given = {f.name: getattr(self, f.name) for f in fields(RenderRequest)}
        return RenderRequest(**{k: v for k, v in given.items() if v is not None})


# --------------------------------------------------------------------------------------------
# AUTOMATIC1111 infotext
# --------------------------------------------------------------------------------------------

NEGATIVE_PREFIX = "Negative prompt:"

# A key starts a segment: a word character, then words, spaces, '-' and '/' (A1111's own pattern,
# one character shorter at the least). Greedy on purpose: ':' is outside the class, so a failed
# match costs one pass over the segment.
_KEY = re.compile(r"\s*(\w[\w \-/]*):\s*")
_INT = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,4})?", re.ASCII)
_SIZE = re.compile(r"([0-9]{1,9})\s*[xX]\s*([0-9]{1,9})", re.ASCII)

TYPED_FIELDS = ("steps", "cfg", "seed", "width", "height", "sampler", "model", "model_hash", "eta", "subseed",
                "subseed_strength")


def _unquote(raw: str) -> str:
    """A1111 quotes values holding ',', ':' or newlines with json.dumps; anything else is as written."""
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return raw
        if isinstance(value, str):
            return value
    return raw


def parse_settings_line(line: str) -> tuple[list[tuple[str, str]], int]:
    """``Key: value, Key: "quoted, value", ...`` -> ([(key, value)], count of segments that were no pair).

    A segment without a key continues the previous unquoted value (``Model: a, b`` is one value).
    Linear in the length of the line.
    """
    items: list[tuple[str, list[str], bool]] = []  # (key, raw value's comma-separated parts, quoted)
    junk = 0
    n = len(line)
    pos = 0
    unclosed_from = n + 1  # a quote scan from here on found no closing quote; so will any later one
    while True:
        m = _KEY.match(line, pos)
        if m is None:
            end = line.find(",", pos)
            end = n if end < 0 else end
            segment = line[pos:end]
            if segment.strip():
                if items and not items[-1][2]:
                    items[-1][1].append(segment)  # joined at the end: growing a string here is quadratic
                else:
                    junk += 1
        else:
            key, start = m.group(1).strip(), m.end()
            end = -1
            if start < n and line[start] == '"' and start < unclosed_from:
                i = start + 1
                while i < n and line[i] != '"':
                    i += 2 if line[i] == "\\" else 1
                if i >= n:
                    unclosed_from = start
                else:
                    j = i + 1
                    while j < n and line[j] in " \t":
                        j += 1
                    if j == n or line[j] == ",":
                        items.append((key, [line[start : i + 1]], True))
                        end = j
            if end < 0:
                end = line.find(",", start)
                end = n if end < 0 else end
                items.append((key, [line[start:end]], False))
        if end >= n:
            break
        pos = end + 1
    return [(k, _unquote(",".join(parts).strip())) for k, parts, _ in items], junk


def _as_int(value: str | None) -> int | None:
    if value is not None and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def _as_float(value: str | None) -> float | None:
    if value is not None and _FLOAT.fullmatch(value.strip()):
        x = float(value)
        return x if math.isfinite(x) else None
    return None


def parse_infotext(text: str) -> dict:
    """Parse AUTOMATIC1111's parameters text.

    Returns ``prompt``, ``negative``, ``settings`` (every ``Key: value`` of the last line, values
    unquoted, as text) and the typed fields ``steps``, ``cfg``, ``seed``, ``width``, ``height``,
    ``sampler``, ``model``, ``model_hash``, ``eta``, ``subseed``, ``subseed_strength``: each None
    when missing or not of its type (the text stays in ``settings``).

    As A1111 reads it: the last line holds the settings when it has at least three pairs; the
    first line that starts (after blanks) with ``Negative prompt:`` begins the negative, and every
    line after it up to the settings belongs to it. Unlike A1111, the prompt keeps the blanks at
    its line ends (only one space after ``Negative prompt:`` is dropped), so sdterm's own text reads
    back exactly. Raises MetadataError when the text holds no prompt and no settings.
    """
    if not isinstance(text, str):
        raise MetadataError(f"parameters must be text, got {type(text).__name__}")
    lines = text.rstrip().split("\n")
    settings: dict[str, str] = {}
    pairs, _ = parse_settings_line(lines[-1])
    if len(pairs) >= 3:
        lines.pop()
        settings = dict(pairs)  # a repeated key: the last one wins, as in A1111
    prompt_lines: list[str] = []
    negative_lines: list[str] | None = None
    for line in lines:
        if negative_lines is None:
            stripped = line.lstrip()
            if stripped.startswith(NEGATIVE_PREFIX):
                rest = stripped[len(NEGATIVE_PREFIX) :]
                negative_lines = [rest[1:] if rest.startswith(" ") else rest]
            else:
                prompt_lines.append(line)
        else:
            negative_lines.append(line)
    prompt = "\n".join(prompt_lines)
    negative = "\n".join(negative_lines or [])
    if not settings and not prompt.strip() and not negative.strip():
        raise MetadataError("no generation parameters in the text (no prompt and no settings line)")

    size = _SIZE.fullmatch(settings.get("Size", "").strip())
    eta = _as_float(settings.get("Eta DDIM"))
    return {
        "prompt": prompt,
        "negative": negative,
        "settings": settings,
        "steps": _as_int(settings.get("Steps")),
        "cfg": _as_float(settings.get("CFG scale")),
        "seed": _as_int(settings.get("Seed")),
        "width": int(size.group(1)) if size else None,
        "height": int(size.group(2)) if size else None,
        "sampler": settings.get("Sampler"),
        "model": settings.get("Model"),
        "model_hash": settings.get("Model hash"),
        "eta": eta if eta is not None else _as_float(settings.get("Eta")),
        "subseed": _as_int(settings.get("Variation seed")),
        "subseed_strength": _as_float(settings.get("Variation seed strength")),
    }


# Which setting each typed field came from (a value that didn't parse stays in ``extra``).
_SOURCE_KEYS = {
    "steps": ("Steps",),
    "cfg": ("CFG scale",),
    "seed": ("Seed",),
    "width": ("Size",),
    "sampler": ("Sampler",),
    "model": ("Model",),
    "model_hash": ("Model hash",),
    "eta": ("Eta DDIM", "Eta"),
    "subseed": ("Variation seed",),
    "subseed_strength": ("Variation seed strength",),
}


def params_from_infotext(text: str) -> ImageParameters:
    parsed = parse_infotext(text)
    settings = dict(parsed["settings"])
    for name, keys in _SOURCE_KEYS.items():
        if parsed[name] is None:
            continue
        if name == "eta" and _as_float(settings.get("Eta DDIM")) is None:
            keys = ("Eta",)
        settings.pop(keys[0], None)
    return ImageParameters(
        source="a1111",
        prompt=parsed["prompt"],
        negative=parsed["negative"],
        extra=settings,
        **{name: parsed[name] for name in TYPED_FIELDS},
    )


# --------------------------------------------------------------------------------------------
# sdterm's JSON chunk
# --------------------------------------------------------------------------------------------


def params_from_sdterm_json(text: str) -> ImageParameters:
    """sdterm's ``sdterm`` chunk; raises MetadataError (one line) when it isn't a valid request."""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise MetadataError("the sdterm chunk is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("request"), dict):
        raise MetadataError("the sdterm chunk has no request object")
    raw = payload["request"]
    known = {f.name for f in fields(RenderRequest)}
    for name in ("prompt", "seed", "steps", "cfg", "width", "height"):
        if name not in raw:
            raise MetadataError(f"the sdterm chunk's request has no {name}")
    req = RenderRequest(**{k: v for k, v in raw.items() if k in known})
    try:
        validate_request(req)
    except ConfigError as exc:
        raise MetadataError(f"the sdterm chunk's request is invalid: {exc}") from None
    for name in ("model", "model_hash"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise MetadataError(f"the sdterm chunk's {name} is not text")
    extra = {
        str(k): v if isinstance(v, str) else json.dumps(v)
        for k, v in payload.items()
        if k not in ("request", "model", "model_hash")
    }
    return ImageParameters(
        source="sdterm",
        prompt=req.prompt,
        negative=req.negative,
        seed=req.seed,
        steps=req.steps,
        cfg=float(req.cfg),
        width=req.width,
        height=req.height,
        eta=float(req.eta),
        subseed=req.subseed,
        subseed_strength=float(req.subseed_strength),
        sampler="DDIM",
        model=payload.get("model"),
        model_hash=payload.get("model_hash"),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

MAX_DECODE_PIXELS = 64 * 2**20
"""Text chunks after the pixel data are read only from images up to this size (Pillow decodes them)."""

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286


def _one_line(text: str) -> str:
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


def _text_chunks(path: Path) -> dict[str, str]:
    """The 'parameters' and 'sdterm' texts of the image at ``path``; MetadataError when unreadable."""
    import warnings

    from PIL import Image

    where = _one_line(path)
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
        raise MetadataError(f"{where}: not a readable image ({_one_line(detail)})") from None
    return out


def read_png_parameters(path: str | Path) -> ImageParameters:
    """The generation parameters of an image: sdterm's JSON chunk when valid, else A1111's text.

    PNG is the format sdterm writes; A1111's JPEG/WebP (EXIF UserComment) are read too. Raises
    MetadataError with one line naming the file when there is nothing usable.
    """
    path = Path(path)
    where = _one_line(path)
    chunks = _text_chunks(path)
    problem = ""
    if "sdterm" in chunks:
        try:
            return params_from_sdterm_json(chunks["sdterm"])
        except MetadataError as exc:
            problem = str(exc)
    if "parameters" in chunks:
        try:
            return params_from_infotext(chunks["parameters"])
        except MetadataError as exc:
            problem = f"{problem}; " if problem else ""
            raise MetadataError(f"{where}: {problem}{exc}") from None
    if problem:
        raise MetadataError(f"{where}: {problem}, and there is no parameters text")
    raise MetadataError(f"{where}: no generation parameters (no 'parameters' or 'sdterm' text in the image)")


# --------------------------------------------------------------------------------------------
# Back to a command
# --------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Shortest text that reads back as the same float ('7' for 7.0, '0.35', '1e-05')."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _opt(flag: str, value: str) -> str:
    # '--negative=-x': a value that starts with '-' would otherwise read as a flag.
    return shlex.quote(f"{flag}={value}") if value.startswith("-") else f"{flag} {shlex.quote(value)}"


def generate_command(params: ImageParameters, model: str | None = None) -> str:
    """A ready-to-run ``sdterm generate`` line for ``params`` (values shell-quoted)."""
    parts = ["sdterm", "generate"]
    dash_prompt = params.prompt.startswith("-")
    if not dash_prompt:
        parts.append(shlex.quote(params.prompt))
    if model is not None:
        parts.append(_opt("--model", str(model)))
    if params.negative:
        parts.append(_opt("--negative", params.negative))
    for flag, value in (("--seed", params.seed), ("--steps", params.steps)):
        if value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    if params.cfg is not None:
        parts.append(f"--cfg {shlex.quote(_num(params.cfg))}")
    for flag, value in (("--width", params.width), ("--height", params.height)):
        if value is not None:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    if params.eta:
        parts.append(f"--eta {shlex.quote(_num(params.eta))}")
    if params.subseed_strength and params.subseed_strength > 0:
        if params.subseed is not None:
            parts.append(f"--subseed {shlex.quote(str(params.subseed))}")
        parts.append(f"--subseed-strength {shlex.quote(_num(params.subseed_strength))}")
    if dash_prompt:
        parts += ["--", shlex.quote(params.prompt)]
    return " ".join(parts)


# Settings that don't change the picture, or that a note below already covers.
_QUIET_KEYS = {
    "Version", "Batch size", "Batch pos", "Hashes", "Template", "Negative Template", "Styles array", "Size-1",
    "Size-2", "Schedule type", "RNG", "Clip skip", "ENSD", "Eta", "Lora hashes", "TI hashes", "VAE", "VAE hash",
    "Seed resize from", "Denoising strength", "Emphasis",
}
_ATTENTION = re.compile(r"(?<!\\)[()\[\]]")


def notes(params: ImageParameters) -> list[str]:
    """What sdterm can't reproduce of ``params``, one short line each (empty when it can)."""
    out: list[str] = []
    x = params.extra
    if params.sampler is not None and params.sampler.strip() != "DDIM":
        out.append(f"sampler {params.sampler}: sdterm samples with DDIM")
    if x.get("Schedule type", "Automatic").strip() not in ("Automatic", ""):
        out.append(f"schedule type {x['Schedule type']}: sdterm uses DDIM's evenly spaced timesteps")
    if params.source == "a1111":
        rng = x.get("RNG", "GPU").strip()
        if rng != "CPU":
            out.append(f"A1111 drew the starting noise with its {rng} generator (RNG: {rng}); sdterm draws it on "
                       "the CPU, as A1111's RNG: CPU does, so the same seed starts from different noise")
    if x.get("Clip skip", "1").strip() not in ("1", ""):
        out.append(f"Clip skip {x['Clip skip']} is not supported: sdterm uses CLIP's last layer")
    if x.get("ENSD", "0").strip() not in ("0", ""):
        out.append(f"ENSD {x['ENSD']} (eta noise seed delta) is not supported")
    hires = sorted(k for k in x if k.startswith("Hires"))
    if hires or "Denoising strength" in x:
        out.append("hires fix is not supported: sdterm renders at the recorded size only")
    if "Seed resize from" in x:
        out.append(f"seed resize from {x['Seed resize from']} is not supported")
    if "Lora hashes" in x or "<lora:" in params.prompt or "<lora:" in params.negative:
        out.append("LoRA is not supported: <lora:...> tags are read as plain text")
    if "TI hashes" in x:
        out.append("textual-inversion embeddings are not supported: their names are read as plain words")
    if "VAE" in x or "VAE hash" in x:
        out.append(f"VAE {x.get('VAE') or x.get('VAE hash')}: sdterm uses the checkpoint's own VAE")
    if params.source == "a1111":
        if _ATTENTION.search(params.prompt) or _ATTENTION.search(params.negative):
            out.append("A1111's attention syntax ((word), [word], (word:1.2)) is read as plain text: "
                       "sdterm weights every token alike")
        if re.search(r"\bBREAK\b", params.prompt + "\n" + params.negative):
            out.append("BREAK is read as a plain word, not as a new 75-token chunk")
    other = [k for k in x if k not in _QUIET_KEYS and not k.startswith("Hires")]
    if params.source == "a1111" and other:
        out.append("not used by sdterm: " + ", ".join(other))
    if params.source == "sdterm" and x.get("demo") == "true":
        out.append("made with the demo model (random weights): the image is noise")
    checks = {"seed": params.seed, "steps": params.steps, "cfg": params.cfg, "width": params.width,
              "height": params.height, "eta": params.eta, "subseed": params.subseed,
              "subseed_strength": params.subseed_strength}
    for name, value in checks.items():
        if value is None:
            continue
        try:
            validate_request(RenderRequest("", **{name: value}))
        except ConfigError as exc:
            out.append(f"{exc}: sdterm will refuse it")
    return out


# --------------------------------------------------------------------------------------------
# sdterm show
# --------------------------------------------------------------------------------------------

_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (but newline and tab) and bidi overrides
    become visible escapes, so an image can't send escape sequences to the screen."""
    def esc(c: str) -> str:
        if c in "\n\t" or (unicodedata.category(c) != "Cc" and c not in _BIDI):
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return "".join(esc(c) for c in text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sdterm show`` on ``parser.add_subparsers(...)``; returns its parser."""
    p = subparsers.add_parser(
        "show",
        help="print an image's prompt and settings, and the sdterm generate line that remakes it",
        description="Reads sdterm's PNGs and AUTOMATIC1111's (PNG parameters text; JPEG/WebP EXIF comment).",
    )
    p.add_argument("image", metavar="IMAGE", help="a PNG from sdterm or AUTOMATIC1111 (A1111 JPEG/WebP too)")
    p.add_argument("--model", metavar="PATH", help="put --model PATH in the generate line")
    p.add_argument("--json", action="store_true", help="one JSON object: the parameters, the command and notes")
    return p


def cmd_show(args: argparse.Namespace) -> int:
    from .cli import UserError  # here, not at the top: cli imports this module

    try:
        params = read_png_parameters(args.image)
    except MetadataError as exc:
        raise UserError(str(exc)) from None
    model = getattr(args, "model", None)
    command = generate_command(params, model)
    found = notes(params)
    if model is None and params.model:
        hashed = f" [{params.model_hash}]" if params.model_hash else ""
        found.append(f"made with model {params.model}{hashed}; the line uses your default model "
                     "(add --model PATH to name one)")
    if args.json:
        out = {"file": str(args.image), **asdict(params), "command": command, "notes": found}
        print(json.dumps(out))
        return 0
    rows: list[tuple[str, str]] = [("source", {"sdterm": "sdterm", "a1111": "AUTOMATIC1111 parameters"}[params.source]),
                                   ("prompt", params.prompt)]
    if params.negative:
        rows.append(("negative", params.negative))
    for label, value in (("seed", params.seed), ("steps", params.steps),
                         ("cfg", None if params.cfg is None else _num(params.cfg))):
        if value is not None:
            rows.append((label, str(value)))
    if params.width is not None:
        rows.append(("size", f"{params.width}x{params.height}"))
    if params.sampler:
        rows.append(("sampler", params.sampler))
    if params.eta:
        rows.append(("eta", _num(params.eta)))
    if params.subseed_strength:
        rows.append(("variation", f"seed {params.subseed}, strength {_num(params.subseed_strength)}"))
    if params.model or params.model_hash:
        rows.append(("model", " ".join(filter(None, [params.model, params.model_hash and f"[{params.model_hash}]"]))))
    rows += list(params.extra.items())
    width = max([10, *(len(label) + 1 for label, _ in rows if len(label) < 24)])
    for label, value in rows:
        pad = " " * (width + 1)
        print(printable(f"{label:<{width}} {value}".replace("\n", "\n" + pad)))
    print()
    shown = printable(command)
    print(shown)
    if shown != command:
        found.append("control characters are shown escaped above; `sdterm show --json` has the exact line")
    for line in found:
        print(f"note: {printable(line)}", file=sys.stderr)
    return 0
