"""Which files an embeddings folder holds: the walk the engine loads them by and ``sdterm show``
checks images against. Standard library only (``show`` must not import torch)."""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")
"""What a folder scan picks up (any case). The loader itself goes by content."""


def embedding_files(folder: Path) -> list[Path]:
    """Embedding files under ``folder``, recursively and following links (as A1111's os.walk),
    each folder visited once (a link loop ends), hidden names skipped, in a stable order."""
    out: list[Path] = []
    visited: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(EMBEDDING_SUFFIXES):
                out.append(Path(root) / name)
    return out
