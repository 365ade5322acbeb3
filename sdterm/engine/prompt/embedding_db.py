"""Folders of textual-inversion embeddings: :class:`EmbeddingDB` (every usable file in some
folders, the problems of the others, trigger words found in a tokenized prompt as A1111's
``find_embedding_at_position`` does: each trigger word's own ids, looked up by their first id,
longest first) and :class:`EmbeddingFolders` (what an engine renders with: rescanned at each use,
each problem told once). One file is :mod:`.embeddings`."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .embedding_files import embedding_files
from .embeddings import EmbeddingError, TextualInversion, load_embedding


Tokenize = Callable[[str], Sequence[int]]
"""A text's token ids without BOS/EOS (CLIP's tokenizer with ``add_special_tokens=False``)."""


@dataclass
class _Seen:
    stamp: tuple[int, int]
    result: TextualInversion | str  # the embedding, or the problem line


@dataclass(eq=False)
class EmbeddingDB:
    """The embeddings in ``folder`` (one folder, or several, searched in order), ``width`` wide.

    Loads every ``.pt``/``.safetensors``/``.bin`` under the folders eagerly (files are tiny);
    files it can't use are skipped and described in :attr:`problems`, one line each. Hidden
    files and folders (``.name``) are not looked at. :meth:`reload` picks up added, changed and
    removed files, reading only the changed ones.
    """

    folder: str | os.PathLike | Sequence[str | os.PathLike]
    width: int = 768
    optional: Sequence[str | os.PathLike] = ()
    """Folders that may be missing without a problem line (a default folder nobody made)."""
    folders: list[Path] = field(init=False, default_factory=list)
    by_name: dict[str, TextualInversion] = field(init=False, default_factory=dict)
    """Trigger word -> embedding, sorted case-insensitively (as A1111 lists them)."""
    _scan_problems: list[str] = field(init=False, default_factory=list)
    _index_problems: list[str] = field(init=False, default_factory=list)
    _seen: dict[Path, _Seen] = field(init=False, default_factory=dict)
    _lookup: dict[int, list[tuple[tuple[int, ...], TextualInversion]]] | None = field(init=False, default=None)
    _lookup_tokenize: Tokenize | None = field(init=False, default=None)
    _lock: threading.RLock = field(init=False, default_factory=threading.RLock)
    """A render and the app's token line may rescan or index at once."""

    def __post_init__(self) -> None:
        if isinstance(self.folder, (str, os.PathLike)):
            self.folders = [Path(self.folder)]
        else:
            self.folders = [Path(f) for f in self.folder]
        self.reload()

    @property
    def problems(self) -> list[str]:
        """One line per file (or folder) that can't be used, naming it and saying why."""
        return [*self._scan_problems, *self._index_problems]

    def __len__(self) -> int:
        return len(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def reload(self) -> bool:
        """Rescan the folders; returns whether the set of embeddings changed."""
        with self._lock:
            return self._reload()

    def _reload(self) -> bool:
        problems: list[str] = []
        found: dict[str, TextualInversion] = {}
        seen: dict[Path, _Seen] = {}
        for folder in self.folders:
            if not folder.is_dir():
                if not folder.exists() and any(Path(o) == folder for o in self.optional):
                    continue
                problems.append(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}")
                continue
            for path in embedding_files(folder):
                try:
                    st = path.stat()
                    stamp = (st.st_size, st.st_mtime_ns)
                except OSError as exc:
                    problems.append(f"{path}: cannot read ({exc.strerror or exc})")
                    continue
                old = self._seen.get(path)
                if old is not None and old.stamp == stamp:
                    entry = old
                else:
                    try:
                        entry = _Seen(stamp, load_embedding(path, self.width))
                    except EmbeddingError as exc:
                        entry = _Seen(stamp, str(exc))
                seen[path] = entry
                if isinstance(entry.result, str):
                    problems.append(entry.result)
                    continue
                emb = entry.result
                if emb.name in found:
                    problems.append(
                        f"{path}: the trigger word {emb.name!r} is already {found[emb.name].path}; this file is not used"
                    )
                    continue
                found[emb.name] = emb
        by_name = {name: found[name] for name in sorted(found, key=lambda n: (n.lower(), n))}
        changed = [(n, e.path, e.sha256) for n, e in by_name.items()] != [
            (n, e.path, e.sha256) for n, e in self.by_name.items()
        ]
        self._seen = seen
        self._scan_problems = problems
        if changed:
            self.by_name = by_name
            self._lookup = None
            self._lookup_tokenize = None
            self._index_problems = []
        return changed

    def find(self, ids: Sequence[int], i: int, tokenize: Tokenize) -> tuple[TextualInversion, int] | None:
        """The embedding whose trigger word's token ids start at ``ids[i]``, and how many of
        ``ids`` it covers; the longest trigger word wins. None where none starts there.

        ``tokenize`` gives a text's ids without BOS/EOS; the trigger words are tokenized with it
        once (again only when a different callable is passed), so pass the same one each time.
        """
        if not 0 <= i < len(ids):
            return None
        candidates = self._index(tokenize).get(ids[i])
        if not candidates:
            return None
        for trigger, emb in candidates:
            n = len(trigger)
            if tuple(ids[i : i + n]) == trigger:
                return emb, n
        return None

    def _index(self, tokenize: Tokenize) -> dict[int, list[tuple[tuple[int, ...], TextualInversion]]]:
        """A1111's ids_lookup: first token id -> [(trigger ids, embedding)], longest first."""
        with self._lock:
            if self._lookup is not None and self._lookup_tokenize == tokenize:  # bound methods: equal, not identical
                return self._lookup
            return self._build_index(tokenize)

    def _build_index(self, tokenize: Tokenize) -> dict[int, list[tuple[tuple[int, ...], TextualInversion]]]:
        lookup: dict[int, list[tuple[tuple[int, ...], TextualInversion]]] = {}
        owner: dict[tuple[int, ...], TextualInversion] = {}
        problems: list[str] = []
        for emb in self.by_name.values():
            trigger = tuple(int(t) for t in tokenize(emb.name))
            if not trigger:
                problems.append(f"{emb.path}: its trigger word {emb.name!r} is no tokens; it can't be used in a prompt")
                continue
            if trigger in owner:
                problems.append(
                    f"{emb.path}: its trigger word {emb.name!r} reads the same as {owner[trigger].name!r} "
                    f"({owner[trigger].path}) to the tokenizer; this file is not used"
                )
                continue
            owner[trigger] = emb
            lookup.setdefault(trigger[0], []).append((trigger, emb))
        for entries in lookup.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)  # stable: ties keep by_name order
        self._lookup, self._lookup_tokenize, self._index_problems = lookup, tokenize, problems
        return lookup


class EmbeddingFolders:
    """The embedding folders an engine renders with: one :class:`EmbeddingDB`, rescanned at each
    use (a file dropped in counts at the next render), and its problems, each told once."""

    def __init__(self, folders: Sequence[Path], width: int, *, optional: Sequence[Path] = ()):
        self.folders = [Path(f) for f in folders]
        self.optional = [Path(f) for f in optional]
        self.width = width
        self.db: EmbeddingDB | None = None
        self._told: set[str] = set()

    def index(self, tokenize: Tokenize) -> EmbeddingDB | None:
        """The folders' embeddings, rescanned, their trigger words indexed with ``tokenize``
        (so a trigger word's problem is known too); None without folders."""
        if not self.folders:
            return None
        if self.db is None:
            self.db = EmbeddingDB(self.folders, self.width, optional=self.optional)
        else:
            self.db.reload()
        self.db.find([], 0, tokenize)
        return self.db

    def untold(self) -> list[str]:
        """The problems not told yet (marked told)."""
        new = [p for p in (self.db.problems if self.db is not None else []) if p not in self._told]
        self._told.update(new)
        return new
