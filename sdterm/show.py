"""``sdterm show IMAGE``: the prompt and settings stored in an image (sdterm's or AUTOMATIC1111's),
what sdterm can't reproduce of them, and a ready-to-run ``sdterm generate`` line. The embeddings
the image names (``TI hashes``) are looked up in the user's embeddings folder by name and file
hash, without loading them (no torch: ``show`` stays quick).

A command on its own: :func:`add_parser` registers it, :func:`run` carries it out. Reading the
metadata is ``sdterm/pngmeta.py``; this module only presents it (and makes it safe to print).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, UserError
from .params import FIELDS, Params
from .pngmeta import ImageParameters, MetadataError, read_png_parameters


def _num(x: float) -> str:
    """Shortest text that reads back as the same float ('7' for 7.0, '0.35', '1e-05')."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def _opt(flag: str, value: str) -> str:
    # '--negative=-x': a value that starts with '-' would otherwise read as a flag.
    return shlex.quote(f"{flag}={value}") if value.startswith("-") else f"{flag} {shlex.quote(value)}"


# Fields the line below spells out one by one; any other Params field gets ``--its-name VALUE``
# when the image recorded a value other than its default.
_SPELLED_OUT = {"prompt", "negative", "seed", "steps", "cfg", "width", "height", "eta", "subseed", "subseed_strength"}


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
    defaults = Params()
    for name in FIELDS:
        value = get(name)
        if name not in _SPELLED_OUT and value is not None and value != getattr(defaults, name):
            parts.append(_opt("--" + name.replace("_", "-"), _num(value) if isinstance(value, float) else str(value)))
    if dash_prompt:
        parts += ["--", shlex.quote(p.prompt)]
    return " ".join(parts)


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
    hires = sorted(k for k in x if k.startswith("Hires"))
    if hires or "Denoising strength" in x:
        out.append("hires fix is not supported: sdterm renders at the recorded size only")
    if "Seed resize from" in x:
        out.append(f"seed resize from {x['Seed resize from']} is not supported")
    if "Lora hashes" in x or "<lora:" in prompt or "<lora:" in negative:
        out.append("LoRA is not supported: <lora:...> tags are read as plain text")
    if "TI hashes" in x:  # what reads as pairs is in found.embeddings
        out.append(f"TI hashes {x['TI hashes']!r}: not name: hash pairs; the embeddings can't be checked")
    if "VAE" in x or "VAE hash" in x:
        out.append(f"VAE {x.get('VAE') or x.get('VAE hash')}: sdterm uses the checkpoint's own VAE")
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


@dataclass(frozen=True)
class EmbeddingCheck:
    """One embedding an image names, looked up in the user's embeddings folders."""

    name: str
    recorded: str
    """The hash the image recorded (A1111: the file's sha256, first 12 hex digits)."""
    file: Path | None = None
    """The file that word finds here; None when none does."""
    here: str | None = None
    """That file's hash, as many hex digits as ``recorded``; None when it can't be read."""

    @property
    def status(self) -> str:
        """``same``, ``missing``, ``different`` or ``unreadable``."""
        if self.file is None:
            return "missing"
        if self.here is None:
            return "unreadable"
        return "same" if self.here == self.recorded.lower() else "different"

    def note(self, where: str) -> str | None:
        """One line for what isn't the image's own file; None when it is."""
        status = self.status
        if status == "missing":
            return f"embedding {self.name} [{self.recorded}]: missing from {where}: the image will differ"
        if status == "different":
            return (f"embedding {self.name} [{self.recorded}]: different file (hash {self.here} here, {self.file}): "
                    "the image will differ")
        if status == "unreadable":
            return f"embedding {self.name}: {self.file} can't be read: the image will differ"
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "hash": self.recorded, "status": self.status,
                "file": None if self.file is None else str(self.file), "hash_here": self.here}


def embedding_files(folders: list[Path]) -> dict[str, Path]:
    """Trigger word -> the file a render would use: the first found, folder by folder, each walked
    as the engine walks it."""
    from .engine.prompt.embedding_files import embedding_files as walk

    found: dict[str, Path] = {}
    for folder in folders:
        for path in walk(folder):
            found.setdefault(path.stem, path)
    return found


def _short_sha256(path: Path, digits: int) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:digits]


def check_embeddings(embeddings: dict[str, str], folders: list[Path]) -> list[EmbeddingCheck]:
    """Each embedding of ``embeddings`` (name -> recorded hash) against the files in ``folders``."""
    files = embedding_files(folders)
    out = []
    for name, recorded in embeddings.items():
        path = files.get(name)
        digits = len(recorded) if re.fullmatch(r"[0-9a-fA-F]{8,64}", recorded) else 12
        out.append(EmbeddingCheck(name, recorded, path, None if path is None else _short_sha256(path, digits)))
    return out


def _embedding_checks(found: ImageParameters, given: str | None) -> tuple[list[EmbeddingCheck], list[str]]:
    """The image's embeddings checked against the user's folder (``--embeddings``, else the
    settings, else the default), and the notes to print."""
    if not found.embeddings:
        return [], []
    from .resolve import embedding_folders, user_config

    try:
        folders, _ = embedding_folders(given or user_config().defaults.embeddings_dir)
    except ConfigError as exc:
        return [], [f"the embeddings were not checked: {exc}"]
    where = " and ".join(str(f) for f in folders)
    checks = check_embeddings(found.embeddings, folders)
    return checks, [line for c in checks if (line := c.note(where)) is not None]


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
    checks, embedding_notes = _embedding_checks(found, getattr(args, "embeddings", None))
    said += embedding_notes
    if model is None and found.model:
        hashed = f" [{found.model_hash}]" if found.model_hash else ""
        said.append(f"made with model {found.model}{hashed}; the line uses your default model "
                    "(add --model PATH to name one)")
    if args.json:
        print(json.dumps({"file": str(args.image), **found.to_dict(), "embedding_files": [c.to_dict() for c in checks],
                          "command": command, "notes": said}))
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
    if get("subseed_strength"):
        rows.append(("variation", f"seed {get('subseed')}, strength {_num(p.subseed_strength)}"))
    if found.model or found.model_hash:
        rows.append(("model", " ".join(filter(None, [found.model, found.model_hash and f"[{found.model_hash}]"]))))
    if found.embeddings:
        marks = {c.name: {"same": "", "missing": " (missing)"}.get(c.status, f" ({c.status} here)") for c in checks}
        rows.append(("embeddings", ", ".join(f"{name} [{short}]{marks.get(name, '')}"
                                             for name, short in found.embeddings.items())))
    rows += list(found.extra.items())
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
