"""``sdterm show IMAGE``: the prompt and settings stored in an image (sdterm's or AUTOMATIC1111's),
what sdterm can't reproduce of them, and a ready-to-run ``sdterm generate`` line. The embeddings
the image names (``TI hashes``), its LoRAs (``<lora:...>`` tags, ``Lora hashes``) and its VAE file
(``VAE``, ``VAE hash``) are looked up in the user's folders by name and file hash, without loading
them (no torch: ``show`` stays quick).

A command on its own: :func:`add_parser` registers it, :func:`run` carries it out. Reading the
metadata is ``sdterm/pngmeta.py``, looking up the files it names ``sdterm/show_files.py``; this
module only presents them (and makes it safe to print).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import unicodedata

from .errors import ConfigError, UserError
from .params import FIELDS, Params, hires_size
from .infotext_hires import hires_notes, number_text
from .pngmeta import ImageParameters, MetadataError, read_png_parameters
from .show_files import addon_checks, embedding_checks
from .stamp import read_stamp, summary as stamp_summary


def _num(x: float) -> str:
    """Shortest text that reads back as the same float ('7' for 7.0, '0.35', '1e-05')."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _opt(flag: str, value: str) -> str:
    # '--negative=-x': a value that starts with '-' would otherwise read as a flag.
    return shlex.quote(f"{flag}={value}") if value.startswith("-") else f"{flag} {shlex.quote(value)}"


# Fields the line below spells out one by one; any other Params field gets ``--its-name VALUE``
# when the image recorded a value other than its default.
_SPELLED_OUT = {"prompt", "negative", "seed", "steps", "cfg", "width", "height", "eta", "subseed", "subseed_strength",
                "init_image", "strength", "hires_scale", "hires_width", "hires_height", "hires_steps",
                "hires_strength", "hires_upscaler"}


def generate_command(found: ImageParameters, model: str | None = None) -> str:
    """A ready-to-run ``sdterm generate`` line for ``found`` (values shell-quoted)."""
    p, get = found.params, found.get
    parts = ["sdterm", "generate"]
    dash_prompt = p.prompt.startswith("-")
    if not dash_prompt:
        parts.append(shlex.quote(p.prompt))
    if model is not None:
        parts.append(_opt("--model", str(model)))
    if p.negative:
        parts.append(_opt("--negative", p.negative))
    for name in ("seed", "steps", "cfg", "width", "height"):
        value = get(name)
        if value is not None:
            parts.append(f"--{name} {shlex.quote(_num(value) if isinstance(value, float) else str(value))}")
    if get("eta"):
        parts.append(f"--eta {shlex.quote(_num(p.eta))}")
    strength = get("subseed_strength")
    if strength and strength > 0:
        if get("subseed") is not None:
            parts.append(f"--subseed {shlex.quote(str(p.subseed))}")
        parts.append(f"--subseed-strength {shlex.quote(_num(strength))}")
    if get("init_image"):  # only sdterm's chunk names it; A1111 records the strength alone
        parts.append(_opt("--init-image", p.init_image))
    if get("strength") is not None and (get("init_image") or found.source == "a1111"):
        parts.append(f"--strength {shlex.quote(_num(p.strength))}")
    parts += hires_flags(p) if any(get(name) for name in ("hires_scale", "hires_width", "hires_height")) else []
    defaults = Params()
    for name in FIELDS:
        value = get(name)
        if name not in _SPELLED_OUT and value is not None and value != getattr(defaults, name):
            parts.append(_opt("--" + name.replace("_", "-"), _num(value) if isinstance(value, float) else str(value)))
    if found.vae:
        parts.append(_opt("--vae", found.vae))
    if dash_prompt:
        parts += ["--", shlex.quote(p.prompt)]
    return " ".join(parts)


def hires_flags(p: Params) -> list[str]:
    """The ``--hires-*`` flags of ``p`` (none when the hires fix is off)."""
    if not p.hires:
        return []
    out = ([f"--hires-size {p.hires_width}x{p.hires_height}"] if p.hires_width or p.hires_height
           else [f"--hires-scale {shlex.quote(number_text(p.hires_scale))}"])
    out += [f"--hires-steps {p.hires_steps}"] if p.hires_steps else []
    return out + [f"--hires-strength {shlex.quote(_num(p.hires_strength))}",
                  _opt("--hires-upscaler", p.hires_upscaler)]


def hires_row(p: Params) -> str:
    """The rows' line for the hires fix: ``2x Latent, 10 steps, strength 0.7 → 1024x1536``."""
    how = f"to {p.hires_width}x{p.hires_height}" if p.hires_width or p.hires_height else f"{number_text(p.hires_scale)}x"
    steps = f"{p.hires_steps} steps" if p.hires_steps else "steps as the first pass"
    w, h = hires_size(p)
    return f"{how} {p.hires_upscaler}, {steps}, strength {_num(p.hires_strength)} → {w}x{h}"


# Settings that don't change the picture, or that a note below already covers.
_QUIET_KEYS = {
    "Version", "Batch size", "Batch pos", "Hashes", "Template", "Negative Template", "Styles array", "Size-1",
    "Size-2", "Schedule type", "RNG", "Clip skip", "ENSD", "Eta", "Lora hashes", "TI hashes", "VAE", "VAE hash",
    "Seed resize from", "Denoising strength", "Emphasis",
}
_ATTENTION = re.compile(r"(?<!\\)[()\[\]]")


def notes(found: ImageParameters) -> list[str]:
    """What sdterm can't reproduce of ``found``, one short line each (empty when it can)."""
    out: list[str] = []
    x = found.extra
    prompt, negative = found.params.prompt, found.params.negative
    if found.sampler is not None and found.get("sampler") is None:
        out.append(f"sampler {found.sampler}: sdterm doesn't have it; the line uses {found.params.sampler}")
    if x.get("Schedule type", "").strip():  # a known one is read into the schedule field
        out.append(f"schedule type {x['Schedule type']}: sdterm doesn't have it; the line uses Automatic")
    if x.get("RNG", "").strip():
        out.append(f"RNG {x['RNG']}: sdterm doesn't have it; the line uses its CPU noise (--rng cpu)")
    if found.source == "a1111" and found.get("sampler") == "DDIM":
        out.append("A1111 (1.6 and later) runs DDIM one update short of sdterm's DDIM (the CompVis form): "
                   "the image comes out slightly different")
    out += hires_notes(x, found.params.hires)
    if "Denoising strength" in x and not any(k.startswith("Hires") for k in x):
        out.append(f"denoising strength {x['Denoising strength']!r} can't be read")
    if found.source == "a1111" and found.get("strength") is not None:
        out.append("an img2img render whose init image isn't recorded: add --init-image PATH to the line")
    if "Seed resize from" in x:
        out.append(f"seed resize from {x['Seed resize from']} is not supported")
    for key, what in (("TI hashes", "embeddings"), ("Lora hashes", "LoRAs")):  # pairs are read into fields
        if key in x:
            out.append(f"{key} {x[key]!r}: not name: hash pairs; the {what} can't be checked")
    if found.vae_hash and not found.vae:
        out.append(f"VAE hash {found.vae_hash} without the VAE's name: the line uses the checkpoint's own VAE")
    if found.source == "a1111":
        if _ATTENTION.search(prompt) or _ATTENTION.search(negative):
            out.append("A1111's attention syntax ((word), [word], (word:1.2)) is read as plain text: "
                       "sdterm weights every token alike")
        if re.search(r"\bBREAK\b", prompt + "\n" + negative):
            out.append("BREAK is read as a plain word, not as a new 75-token chunk")
    other = [k for k in x if k not in _QUIET_KEYS and not k.startswith("Hires")]
    if found.source == "a1111" and other:
        out.append("not used by sdterm: " + ", ".join(other))
    if found.source == "sdterm" and x.get("demo") == "true":
        out.append("made with the demo model (random weights): the image is noise")
    for name in FIELDS:
        value = found.get(name)
        if name in ("prompt", "negative") or value is None:
            continue
        try:
            Params(**{name: value}).validated()
        except ConfigError as exc:
            out.append(f"{exc}: sdterm will refuse it")
    return out


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
    p.add_argument("--embeddings", metavar="DIR",
                   help="look for the image's embeddings here (default: as sdterm generate finds them)")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="look for the image's LoRAs here (default: as sdterm generate finds them)")
    p.add_argument("--json", action="store_true", help="one JSON object: the parameters, the command and notes")
    return p


def run(args: argparse.Namespace) -> int:
    """``sdterm show``: print the parameters, then the generate line (notes on stderr)."""
    try:
        found = read_png_parameters(args.image)
    except MetadataError as exc:
        raise UserError(str(exc)) from None
    model = getattr(args, "model", None)
    command = generate_command(found, model)
    said = notes(found)
    checks, embedding_notes = embedding_checks(found, getattr(args, "embeddings", None))
    said += embedding_notes
    lora_checks, addon_notes = addon_checks(found, getattr(args, "lora_dir", None))
    said += addon_notes
    if model is None and found.model:
        hashed = f" [{found.model_hash}]" if found.model_hash else ""
        said.append(f"made with model {found.model}{hashed}; the line uses your default model "
                    "(add --model PATH to name one)")
    stamp = read_stamp(args.image) if found.source == "sdterm" else None  # how it was made (sdterm verify's)
    if args.json:
        print(json.dumps({"file": str(args.image), **found.to_dict(), "embedding_files": [c.to_dict() for c in checks],
                          "lora_files": lora_checks, "stamp": stamp, "command": command, "notes": said}))
        return 0
    p, get = found.params, found.get
    rows: list[tuple[str, str]] = [("source", {"sdterm": "sdterm", "a1111": "AUTOMATIC1111 parameters"}[found.source]),
                                   ("prompt", p.prompt)]
    if p.negative:
        rows.append(("negative", p.negative))
    for label, value in (("seed", get("seed")), ("steps", get("steps")),
                         ("cfg", None if get("cfg") is None else _num(p.cfg))):
        if value is not None:
            rows.append((label, str(value)))
    if get("width") is not None:
        rows.append(("size", f"{get('width')}x{get('height')}"))
    if get("sampler"):
        rows.append(("sampler", p.sampler if p.schedule == "Automatic" else f"{p.sampler}, schedule {p.schedule}"))
    elif found.sampler:
        rows.append(("sampler", f"{found.sampler} (not one sdterm has)"))
    if get("rng"):
        rows.append(("rng", p.rng))
    if get("eta"):
        rows.append(("eta", _num(p.eta)))
    if get("eta_ancestral") is not None and p.eta_ancestral != 1.0:
        rows.append(("eta (ancestral)", _num(p.eta_ancestral)))
    if get("ensd"):
        rows.append(("ENSD", str(p.ensd)))
    if get("clip_skip") not in (None, 1):
        rows.append(("clip skip", str(p.clip_skip)))
    if get("init_image") or (found.source == "a1111" and get("strength") is not None):
        rows.append(("img2img", f"strength {_num(p.strength)}" + (f" from {p.init_image}" if p.init_image else "")))
    if p.hires:
        rows.append(("hires", hires_row(p)))
    if get("subseed_strength"):
        rows.append(("variation", f"seed {get('subseed')}, strength {_num(p.subseed_strength)}"))
    if found.model or found.model_hash:
        rows.append(("model", " ".join(filter(None, [found.model, found.model_hash and f"[{found.model_hash}]"]))))
    if found.embeddings:
        marks = {c.name: {"same": "", "missing": " (missing)"}.get(c.status, f" ({c.status} here)") for c in checks}
        rows.append(("embeddings", ", ".join(f"{name} [{short}]{marks.get(name, '')}"
                                             for name, short in found.embeddings.items())))
    if found.loras:
        rows.append(("LoRAs", ", ".join(f"{name} [{short}]" for name, short in found.loras.items())))
    if found.vae or found.vae_hash:
        rows.append(("VAE", " ".join(filter(None, [found.vae, found.vae_hash and f"[{found.vae_hash}]"]))))
    rows += list(found.extra.items())
    if stamp:
        rows.append(("made on", stamp_summary(stamp)))
    width = max([10, *(len(label) + 1 for label, _ in rows if len(label) < 24)])
    for label, value in rows:
        pad = " " * (width + 1)
        print(printable(f"{label:<{width}} {value}".replace("\n", "\n" + pad)))
    print()
    shown = printable(command)
    print(shown)
    if shown != command:
        said.append("control characters are shown escaped above; `sdterm show --json` has the exact line")
    for line in said:
        print(f"note: {printable(line)}", file=sys.stderr)
    return 0
