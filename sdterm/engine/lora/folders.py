"""Where LoRA files are found: by name (the file name without its extension, any depth under the
folders, hidden names skipped, the first folder first), each file read once while its size and
modification time stay the same; the few most recently used are kept in memory (a LoRA is tens to
hundreds of MB: an afternoon of trying LoRAs must not pile them all up)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .files import LORA_SUFFIXES, LoraError, LoraFile, Targets, read_lora


KEEP = 6
"""LoRA files kept read in memory, the most recently used first."""


class LoraFolders:
    def __init__(self, folders: Sequence[Path], *, optional: Sequence[Path] = ()):
        self.folders = [Path(f) for f in folders]
        self.optional = [Path(f) for f in optional]
        self._read: dict[Path, tuple[tuple[int, int], LoraFile | str]] = {}

    def files(self) -> dict[str, Path]:
        """Name -> file, the first found winning."""
        found: dict[str, Path] = {}
        for folder in self.folders:
            for root, dirs, names in os.walk(folder, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and name.lower().endswith(LORA_SUFFIXES):
                        found.setdefault(Path(name).stem, Path(root) / name)
        return found

    def problems(self) -> list[str]:
        """Folders the user named that aren't there."""
        return [f"{f}: no such folder" for f in self.folders if not f.is_dir() and f not in self.optional]

    def load(self, name: str, targets: Targets) -> LoraFile:
        """The LoRA called ``name``; :class:`LoraError` (one line) when there is none or it can't be used."""
        path = self.files().get(name)
        if path is None:
            where = " or ".join(str(f) for f in self.folders) or "no LoRA folder"
            raise LoraError(f"LoRA not found: {name} (looked in {where})")
        try:
            st = path.stat()
        except OSError as exc:
            raise LoraError(f"{path}: cannot read ({exc.strerror or exc})") from None
        stamp = (st.st_size, st.st_mtime_ns)
        seen = self._read.get(path)
        if seen is None or seen[0] != stamp:
            try:
                result: LoraFile | str = read_lora(path, targets)
            except LoraError as exc:
                result = str(exc)
            seen = (stamp, result)
        self._read.pop(path, None)
        self._read[path] = seen  # the most recent last
        while len(self._read) > KEEP:
            del self._read[next(iter(self._read))]
        if isinstance(seen[1], str):
            raise LoraError(seen[1])
        return seen[1]
