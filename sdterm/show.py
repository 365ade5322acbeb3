"""``sdterm show IMAGE``: the prompt and settings stored in an image (sdterm's or AUTOMATIC1111's),
what sdterm can't reproduce of them, and a ready-to-run ``sdterm generate`` line. The embeddings
the image names (``TI hashes``), its LoRAs (``<lora:...>`` tags, ``Lora hashes``) and its VAE file
(``VAE``, ``VAE hash``) are looked up in the user's folders by name and file hash, without loading
them (no torch: ``show`` stays quick).

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
_SPELLED_OUT = {"prompt", "negative", "seed", "steps", "cfg", "width", "height", "eta", "subseed", "subseed_strength",
                "init_image", "strength"}


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


def lora_names(found: ImageParameters) -> dict[str, str]:
    """The LoRAs an image used -> the hash it recorded ("" for none): its ``Lora hashes``, then the
    ``<lora:NAME:...>`` tags of its prompts that the hashes don't name."""
    from .prompt_syntax import NetworkTagError, extra_networks

    names = dict(found.loras)
    for text in (found.params.prompt, found.params.negative):
        try:
            tags = extra_networks(text)[1]
        except NetworkTagError:
            continue
        for tag in tags:
            if getattr(tag, "kind", "lora") == "lora":
                names.setdefault(tag.name, "")
    return names


def lora_files(folders: list[Path]) -> dict[str, Path]:
    """LoRA name -> file, as the engine finds them (any depth, hidden names skipped, the first wins)."""
    import os

    found: dict[str, Path] = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith(".") and name.lower().endswith((".safetensors", ".pt", ".ckpt")):
                    found.setdefault(Path(name).stem, Path(root) / name)
    return found


def lora_hash(path: Path, digits: int = 12) -> str | None:
    """A1111's LoRA hash: for .safetensors the sha256 of the bytes after the 8-byte header length
    and the JSON header (kohya's ``sshs_model_hash``), else of the whole file; ``digits`` hex digits."""
    if path.suffix.lower() != ".safetensors":
        return _short_sha256(path, digits)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
            while block := f.read(1 << 20):
                digest.update(block)
    except (OSError, ValueError, OverflowError):
        return None
    return digest.hexdigest()[:digits]


def _addon_checks(found: ImageParameters, given_lora_dir: str | None) -> tuple[list[dict], list[str]]:
    """The image's LoRAs and VAE file looked up in the user's folders: (the LoRAs as JSON, the notes)."""
    from . import paths
    from .resolve import lora_folders, user_config

    checks: list[dict] = []
    said: list[str] = []
    names = lora_names(found)
    if names:
        try:
            folders, _ = lora_folders(given_lora_dir or user_config().defaults.lora_dir)
        except ConfigError as exc:
            return [], [f"the LoRAs were not checked: {exc}"]
        files = lora_files(folders)
        where = " and ".join(str(f) for f in folders)
        for name, recorded in names.items():
            path = files.get(name)
            digits = len(recorded) if re.fullmatch(r"[0-9a-fA-F]{8,64}", recorded) else 12
            here = lora_hash(path, digits) if path is not None and recorded else None
            status = ("missing" if path is None else "found" if not recorded
                      else "unreadable" if here is None else "same" if here == recorded.lower() else "different")
            tag = f" [{recorded}]" if recorded else ""
            if status == "missing":
                said.append(f"LoRA {name}{tag}: missing from {where}: the image will differ")
            elif status == "different":
                said.append(f"LoRA {name}{tag}: different file (hash {here} here, {path}): the image will differ")
            elif status == "unreadable":
                said.append(f"LoRA {name}: {path} can't be read: the image will differ")
            checks.append({"name": name, "hash": recorded or None, "status": status,
                           "file": None if path is None else str(path), "hash_here": here})
    if found.vae:
        vae = paths.vae_dir() / Path(found.vae.replace("\\", "/")).name  # a name, never a path from the image
        recorded = found.vae_hash or ""
        if not vae.is_file():
            said.append(f"VAE {found.vae}: missing from {paths.vae_dir()}: put it there, or give --vae PATH")
        elif recorded and (here := _short_sha256(vae, len(recorded))) != recorded.lower():
            said.append(f"VAE {found.vae} [{recorded}]: different file (hash {here} here, {vae}): the image will differ")
    return checks, said


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
    checks, embedding_notes = _embedding_checks(found, getattr(args, "embeddings", None))
    said += embedding_notes
    lora_checks, addon_notes = _addon_checks(found, getattr(args, "lora_dir", None))
    said += addon_notes
    if model is None and found.model:
        hashed = f" [{found.model_hash}]" if found.model_hash else ""
        said.append(f"made with model {found.model}{hashed}; the line uses your default model "
                    "(add --model PATH to name one)")
    if args.json:
        print(json.dumps({"file": str(args.image), **found.to_dict(), "embedding_files": [c.to_dict() for c in checks],
                          "lora_files": lora_checks, "command": command, "notes": said}))
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
