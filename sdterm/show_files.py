"""``sdterm show``'s look-up of the files an image names, without loading them (no torch): its
textual-inversion embeddings (``TI hashes``) in the embeddings folders, its LoRAs (``Lora hashes``,
``<lora:...>`` tags) in the LoRA folders and its VAE file in the vae folder, each by name and by
file hash. ``sdterm/show.py`` prints what they find."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .pngmeta import ImageParameters


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


def embedding_checks(found: ImageParameters, given: str | None) -> tuple[list[EmbeddingCheck], list[str]]:
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


def addon_checks(found: ImageParameters, given_lora_dir: str | None) -> tuple[list[dict], list[str]]:
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
