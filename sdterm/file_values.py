"""File names the prompt box completes: images and folders (``/open``, ``/load``, ``/recall``) and
the model files of a folder (``/vae``, ``/lora``). Standard library only; a leaf."""

from __future__ import annotations

import os
from pathlib import Path


def image_paths(typed: str) -> list[str]:
    """Folders (with a trailing "/") and ``.png`` files whose path starts with ``typed``, spelled as
    typed (``~`` is expanded to list the folder, kept in the result). Hidden names only when typed."""
    if typed == "~":
        return ["~/"]
    base = typed.rpartition("/")[2]
    head = typed[: len(typed) - len(base)]
    folder = os.path.expanduser(head) if head else "."
    out: list[str] = []
    try:
        with os.scandir(folder) as it:
            for i, item in enumerate(it):
                if i >= _MAX_LISTED:
                    break
                if not item.name.startswith(base) or (item.name.startswith(".") and not base.startswith(".")):
                    continue
                if item.is_dir():
                    out.append(head + item.name + "/")
                elif item.name.lower().endswith(".png") and item.is_file():
                    out.append(head + item.name)
    except OSError:
        return []
    return sorted(out)


_MAX_LISTED = 5000
"""Entries of one folder looked at while completing (a keystroke must stay fast)."""


def folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The names of the files in ``folder`` ending in one of ``suffixes`` (any case), sorted; none
    when the folder is missing or unreadable."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for i, e in zip(range(_MAX_LISTED), it)
                          if e.name.lower().endswith(suffixes) and not e.name.startswith(".") and e.is_file())
    except OSError:
        return []
