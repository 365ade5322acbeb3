"""PNG metadata, written and read in one place: AUTOMATIC1111's ``parameters`` text (the "infotext")
and sdterm's own ``sdterm`` JSON chunk.

* :func:`png_bytes` encodes a finished image with both: the infotext (prompt, ``Negative prompt:``
  line, ``Steps: 20, Sampler: DDIM, ...``) and the JSON (``{"request": Params.to_dict(), "model":
  ..., "model_hash": ..., ...}``).
* :func:`read_png_parameters` reads them back, best first: sdterm's chunk, checked by the one
  parameter validator before it is trusted; else the infotext (PNG text chunk, or the EXIF
  UserComment of an A1111 JPEG/WebP): prompt lines, an optional ``Negative prompt:`` part, and a
  last line of ``Key: value`` pairs (``TI hashes`` read into :attr:`ImageParameters.embeddings`,
  ``Lora hashes`` into ``loras``, ``VAE``/``VAE hash`` into ``vae``/``vae_hash``).
  The sampler, schedule, RNG, eta and ENSD keys: ``infotext_sampler.py``.

The infotext parser never raises on odd text except :class:`MetadataError` when nothing usable is
in it, and its work is linear in the length of the text (no backtracking regex over a whole line).
Printing what was read (``sdterm show``) is ``sdterm/show.py``."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import ConfigError
from .imagetext import MetadataError, image_texts, one_line
from .infotext_hires import hires_pairs, read_hires
from .infotext_sampler import read_sampler, schedule_pairs, tail_pairs
from .params import FIELDS, Params
from .units import parse_wh


@dataclass(frozen=True)
class ImageParameters:
    """What an image says about how it was made: its render parameters and what sdterm can't render."""

    source: str
    """'sdterm' (the JSON chunk) or 'a1111' (the parameters text)."""
    params: Params
    """The render parameters (not validated); a field the image didn't record holds its default."""
    recorded: frozenset[str] = frozenset(FIELDS)
    """The :class:`Params` fields the image recorded (:meth:`get` gives None for the others)."""
    sampler: str | None = None
    """The ``Sampler`` text as recorded ("DPM++ 2M Karras"; ``params.sampler``: "DPM++ 2M", if known)."""
    model: str | None = None
    """The model's name as recorded (a file stem, not a path)."""
    model_hash: str | None = None
    embeddings: dict[str, str] = field(default_factory=dict)
    """The textual-inversion embeddings the image used (``TI hashes``): trigger word -> the first
    12 hex digits of the file's sha256."""
    loras: dict[str, str] = field(default_factory=dict)
    """The LoRAs the image used (``Lora hashes``): the name in the prompt's ``<lora:NAME:W>`` -> A1111's
    12-digit LoRA hash (the tags themselves stay in the prompt)."""
    vae: str | None = None
    """The external VAE file's name with extension (``VAE``); None: the checkpoint's own."""
    vae_hash: str | None = None
    """``VAE hash``: the first 10 hex digits of the VAE file's sha256."""
    extra: dict[str, str] = field(default_factory=dict)
    """Settings with no field above (A1111's ``Lora hashes``, ``VAE``..., sdterm's ``demo``)."""

    def get(self, name: str) -> Any:
        """The recorded value of the :class:`Params` field ``name``; None when the image didn't record it."""
        return getattr(self.params, name) if name in self.recorded else None

    def to_dict(self) -> dict[str, Any]:
        """One flat object (``sdterm show --json``): source, each parameter (None when not recorded),
        sampler, model, model_hash, embeddings, loras, vae, vae_hash, extra."""
        return {"source": self.source, **{name: self.get(name) for name in FIELDS},
                "sampler": self.get("sampler") or self.sampler,
                "model": self.model, "model_hash": self.model_hash, "embeddings": dict(self.embeddings),
                "loras": dict(self.loras), "vae": self.vae, "vae_hash": self.vae_hash, "extra": dict(self.extra)}


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

INFOTEXT_KEYS: dict[str, tuple[str, ...]] = {
    "steps": ("Steps",),
    "cfg": ("CFG scale",),
    "seed": ("Seed",),
    "subseed": ("Variation seed",), "subseed_strength": ("Variation seed strength",),
    "eta": ("Eta DDIM",), "eta_ancestral": ("Eta",),
    "ensd": ("ENSD",), "clip_skip": ("Clip skip",), "strength": ("Denoising strength",),
}
""":class:`Params` field -> its infotext key (the one written first, then other spellings read).
``width`` and ``height`` share ``Size: WxH``; the prompt and the negative are lines of their own."""

DETAIL_KEYS = {"sampler": "Sampler", "model": "Model", "model_hash": "Model hash"}
""":class:`ImageParameters` fields that are no render parameter -> their infotext key."""

TI_HASHES = "TI hashes"
"""A1111's key for the textual-inversion embeddings a render used: ``name: 0123456789ab, ...``
(:attr:`ImageParameters.embeddings`)."""

LORA_HASHES = "Lora hashes"
"""A1111's key for the LoRAs a render used: ``"name: 0123456789ab, ..."`` (quoted;
:attr:`ImageParameters.loras`)."""
VAE_HASH, VAE = "VAE hash", "VAE"
"""A1111's keys for an external VAE file: the first 10 hex digits of its sha256, its file name
with extension (:attr:`ImageParameters.vae_hash`, :attr:`ImageParameters.vae`)."""

_WRITTEN_IN_ORDER = ("steps", "cfg", "seed", "subseed", "subseed_strength", "eta", "eta_ancestral", "ensd", "sampler",
                     "schedule", "rng", "strength")  # the others: written when not their default


def _infotext_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def infotext(params: Params, model_name: str, model_hash: str, extra: dict[str, str] | None = None) -> str:
    """AUTOMATIC1111's parameters text: prompt, optional negative line, then the settings line.

    ``extra`` is A1111's ``extra_generation_params`` (the engine's ``TI hashes``, ``Lora hashes``):
    written after the fixed settings, quoted as A1111 quotes them (``TI hashes: "a: 0123456789ab,
    b: ..."``); ``VAE hash`` and ``VAE`` go right after ``Model``, where A1111 writes them."""
    p = params
    lines = [p.prompt]
    if p.negative:
        lines.append(f"{NEGATIVE_PREFIX} {p.negative}")
    settings = [f"Steps: {p.steps}", f"Sampler: {p.sampler}", *schedule_pairs(p), f"CFG scale: {p.cfg:g}",
                f"Seed: {p.seed}"]
    if p.subseed_strength:
        settings += [f"Variation seed: {p.subseed}", f"Variation seed strength: {p.subseed_strength:g}"]
    extra = dict(extra or {})
    vae = [f"{key}: {_infotext_value(extra.pop(key))}" for key in (VAE_HASH, VAE) if key in extra]
    settings += [f"Size: {p.width}x{p.height}", f"Model hash: {model_hash}", f"Model: {model_name}", *vae,
                 *tail_pairs(p)]
    defaults = Params()
    for name, keys in INFOTEXT_KEYS.items():
        if name not in _WRITTEN_IN_ORDER and getattr(p, name) != getattr(defaults, name):
            settings.append(f"{keys[0]}: {_infotext_value(getattr(p, name))}")
    settings += hires_pairs(p) + [f"{key}: {_infotext_value(value)}" for key, value in extra.items()]
    lines.append(", ".join(settings))
    return "\n".join(lines)


def parse_ti_hashes(text: str) -> dict[str, str]:
    """A ``TI hashes`` value -> {trigger word: short hash}. A1111 writes ``name: hash`` pairs
    joined by ``", "`` (names without ``:`` or ``,``); a part that is no such pair is skipped."""
    out: dict[str, str] = {}
    for part in text.split(","):
        name, sep, short = part.partition(":")
        name, short = name.strip(), short.strip()
        if sep and name and short:
            out.setdefault(name, short)
    return out


def _known_from(extra: dict[str, str]) -> dict[str, Any]:
    """Take the known extras out of ``extra`` (``TI hashes``, ``Lora hashes`` when they read as
    pairs; ``VAE``, ``VAE hash``) as :class:`ImageParameters` fields."""
    known: dict[str, Any] = {}
    for key, name in ((TI_HASHES, "embeddings"), (LORA_HASHES, "loras")):
        known[name] = parse_ti_hashes(extra.get(key, ""))  # the same "name: hash, ..." list
        if known[name]:
            del extra[key]
    for key, name in ((VAE, "vae"), (VAE_HASH, "vae_hash")):
        value = extra.pop(key, "").strip()
        known[name] = value or None
    return known


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


def _typed_settings(settings: dict[str, str]) -> dict[str, tuple[Any, str]]:
    """field -> (typed value, the key it was read from), for the fields the settings hold a value of
    the right type for: the :data:`INFOTEXT_KEYS` parameters, ``width``/``height`` and :data:`DETAIL_KEYS`."""
    out: dict[str, tuple[Any, str]] = {}
    for name, keys in INFOTEXT_KEYS.items():
        kind = type(getattr(Params(), name))
        for key in keys:
            text = settings.get(key)
            value = _as_int(text) if kind is int else _as_float(text) if kind is float else text
            if value is not None:
                out[name] = (value, key)
                break
    if "Size" in settings:
        try:
            width, height = parse_wh(settings["Size"])
            out["width"], out["height"] = (width, "Size"), (height, "Size")
        except ConfigError:
            pass
    for name, key in DETAIL_KEYS.items():
        if key in settings:
            out[name] = (settings[key], key)
    return out


def parse_infotext(text: str) -> dict:
    """Parse AUTOMATIC1111's parameters text.

    Returns ``prompt``, ``negative``, ``settings`` (every ``Key: value`` of the last line, values
    unquoted, as text) and the typed fields: each :class:`Params` field of :data:`INFOTEXT_KEYS`
    (``steps``, ``cfg``, ``seed``, ``eta``, ``eta_ancestral``, ``ensd``...), ``width`` and ``height``
    (from ``Size``), and ``sampler`` (as written), ``model``, ``model_hash``: each None when missing or
    not of its type (the text stays in ``settings``). :func:`params_from_infotext` reads the sampler.

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

    return {"prompt": prompt, "negative": negative, "settings": settings,
            **{name: None for name in (*INFOTEXT_KEYS, "width", "height", *DETAIL_KEYS)},
            **{name: value for name, (value, _) in _typed_settings(settings).items()}}


def params_from_infotext(text: str) -> ImageParameters:
    """The parameters in AUTOMATIC1111's text; settings that aren't a typed field stay in ``extra``."""
    parsed = parse_infotext(text)
    settings = dict(parsed["settings"])
    found = _typed_settings(settings)
    hires_strength = found.pop("strength", (None,))[0] if any(k.startswith("Hires") for k in settings) else None
    hires, hires_used = read_hires(settings, hires_strength)  # the hires fix's strength, not img2img's
    typed = {name: value for name, (value, _) in found.items() if name in FIELDS and name not in DETAIL_KEYS}
    named, used = read_sampler(settings, typed)
    for key in {key for _, key in found.values()} | used | hires_used:
        settings.pop(key, None)
    params = {**typed, **named, **hires}
    known = _known_from(settings)
    return ImageParameters(
        source="a1111",
        params=Params(prompt=parsed["prompt"], negative=parsed["negative"], **params),
        recorded=frozenset({"prompt", "negative", *params}),
        **known,
        extra=settings,
        **{name: found[name][0] for name in DETAIL_KEYS if name in found},
    )


# --------------------------------------------------------------------------------------------
# sdterm's JSON chunk
# --------------------------------------------------------------------------------------------


def sdterm_chunk(params: Params, model_name: str, model_hash: str, extra: dict | None = None) -> str:
    """sdterm's ``sdterm`` chunk: ``{"request": params.to_dict(), "model", "model_hash", **extra}``
    (``extra``: ``demo``, and the infotext's extras such as ``TI hashes``)."""
    payload = {"request": params.to_dict(), "model": model_name, "model_hash": model_hash, **(extra or {})}
    return json.dumps(payload, sort_keys=True)


def params_from_sdterm_json(text: str) -> ImageParameters:
    """sdterm's ``sdterm`` chunk; raises MetadataError (one line) when it isn't a valid request."""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        raise MetadataError("the sdterm chunk is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("request"), dict):
        raise MetadataError("the sdterm chunk has no request object")
    try:
        params = Params.from_dict(payload["request"])
    except ConfigError as exc:
        raise MetadataError(f"the sdterm chunk's request is invalid: {exc}") from None
    for name in ("model", "model_hash"):
        if payload.get(name) is not None and not isinstance(payload[name], str):
            raise MetadataError(f"the sdterm chunk's {name} is not text")
    extra = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in payload.items()
             if k not in ("request", "model", "model_hash", "stamp")}  # stamp: stamp.py
    known = _known_from(extra)
    return ImageParameters(source="sdterm", params=params, sampler=params.sampler, model=payload.get("model"),
                           model_hash=payload.get("model_hash"), **known, extra=extra)


def png_bytes(image: Image.Image, params: Params, model_name: str, model_hash: str, extra: dict | None = None,
              infotext_extra: dict[str, str] | None = None) -> bytes:
    """``image`` encoded as PNG with both texts: ``parameters`` (infotext) and ``sdterm`` (JSON).
    ``extra`` goes in the JSON only; ``infotext_extra`` (A1111's extra generation params, such as
    ``TI hashes``) in both."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(params, model_name, model_hash, infotext_extra))
    info.add_text("sdterm", sdterm_chunk(params, model_name, model_hash, {**(extra or {}), **(infotext_extra or {})}))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def read_png_parameters(path: str | Path) -> ImageParameters:
    """The generation parameters of an image: sdterm's JSON chunk when valid, else A1111's text.

    PNG is the format sdterm writes; A1111's JPEG/WebP (EXIF UserComment) are read too. Raises
    MetadataError with one line naming the file when there is nothing usable.
    """
    path = Path(path)
    where = one_line(path)
    chunks = image_texts(path)
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
