"""The on-disk prompt-embedding cache: the text encoder runs once per model, tokenizer, clip skip
and prompt chunk.

What is cached is the encoder's *unweighted* output for one 77-token chunk (A1111's chunking,
``prompt/conditioning.py``): emphasis weights, chunk order and (later) prompt scheduling are
applied after the cache, so changing a weight or moving a chunk never runs the encoder.
Entries are safetensors files holding one fp16 ``embedding`` tensor of shape (77, dim) and
metadata (format, key, prompt, model hash, time). Keys are sha256 over the format version, the
text-encoder weights' identity, the tokenizer's identity, the device type and dtype the encoder
ran in, the clip skip and the chunk's token ids, so two models (or precisions, or clip skips)
never share entries. Any read problem
(missing, truncated, foreign, wrong shape) is a miss; writes go through a temporary file and a
rename, so concurrent sdterm processes never see a torn entry. Recency is the file's mtime
(touched on every hit); the least recently used go first when the folder outgrows its cap.
Never a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch only where a tensor is read or written: `sdterm cache` never imports it
    import torch

FORMAT_VERSION = 2
"""2: one entry per 77-token chunk of ids, clip skip in the key (1: one per prompt text)."""
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 256 * 2**20
STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    oldest: float | None
    """mtime (last use) of the least recently used entry."""
    newest: float | None


def cache_key(encoder_id: str, tokenizer_id: str, ids, *, precision: str, clip_skip: int = 1, fixes: str = "") -> str:
    """The key of one chunk's entry (``ids``: the chunk's 77 token ids). ``precision`` names where
    the encoder ran and in which dtype (e.g. ``cuda-float16``): the same weights give slightly
    different embeddings in fp16 on a GPU and in fp32 on the CPU, and a hit must give exactly the
    pixels a miss would have. ``fixes`` names the textual-inversion embeddings placed in the chunk
    (position and file sha256 of each, ``Chunk.fix_signature``); a chunk without any keeps the key
    it always had."""
    h = hashlib.sha256()
    ids_text = "ids:" + ",".join(str(int(i)) for i in ids)
    parts = [f"sdterm-embedding-v{FORMAT_VERSION}", encoder_id, tokenizer_id, precision, f"clip-skip={int(clip_skip)}",
             ids_text]
    if fixes:
        parts.append(f"embeddings:{fixes}")
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(struct.pack("<Q", len(data)))  # length-prefixed: no ambiguity between parts
        h.update(data)
    return h.hexdigest()


def _read_header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("truncated header")
    return json.loads(data[8 : 8 + n])


class EmbeddingCache:
    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}{SUFFIX}"

    def _entries(self) -> list[tuple[Path, os.stat_result]]:
        out = []
        if not self.folder.is_dir():
            return out
        for sub in self.folder.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.endswith(SUFFIX) and not f.name.startswith("."):
                    try:
                        out.append((f, f.stat()))
                    except OSError:
                        pass
        return out

    # ---- reading -----------------------------------------------------------------------------

    def get(self, key: str, dim: int | None = None, *, touch: bool = True) -> torch.Tensor | None:
        """The stored fp16 (tokens, dim) embedding, or None. Bad entries are removed (a miss).
        A hit marks the entry as recently used unless ``touch`` is false."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            import torch
            from safetensors.torch import load

            meta = _read_header(data).get("__metadata__") or {}
            if meta.get("format") != str(FORMAT_VERSION) or meta.get("key") != key:
                raise ValueError("foreign entry")
            tensors = load(data)
            emb = tensors["embedding"]
            if set(tensors) != {"embedding"} or emb.dtype != torch.float16 or emb.dim() != 2:
                raise ValueError("unexpected contents")
            if dim is not None and emb.shape[1] != dim:
                raise ValueError("wrong width")
            if not torch.isfinite(emb).all():
                raise ValueError("non-finite values")
        except Exception:
            self._discard(path)
            return None
        if touch:
            try:
                os.utime(path)  # recency for LRU eviction
            except OSError:
                pass
        return emb

    def _discard(self, path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    # ---- writing -----------------------------------------------------------------------------

    def put(self, key: str, embedding: torch.Tensor, *, prompt: str, model_hash: str) -> Path:
        """Store ``embedding`` (any float dtype; stored as fp16 (tokens, dim)). Raises OSError if the
        folder is unwritable; the caller decides whether that matters."""
        import torch
        from safetensors.torch import save

        from ..fsutil import atomic_write_bytes

        emb = embedding.detach().reshape(-1, embedding.shape[-1]).to("cpu", torch.float16).contiguous()
        meta = {
            "format": str(FORMAT_VERSION),
            "key": key,
            "prompt": prompt,
            "model_hash": model_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = self.path(key)
        atomic_write_bytes(path, save({"embedding": emb}, metadata=meta))
        self.evict()
        return path

    def put_many(self, entries: dict[str, tuple[torch.Tensor, str]], *, model_hash: str) -> None:
        """Store each ``key: (embedding, prompt)`` (a dict: a text shared by two roles is stored once).
        Raises OSError at the first entry that can't be written."""
        for key, (embedding, prompt) in entries.items():
            self.put(key, embedding, prompt=prompt, model_hash=model_hash)

    # ---- housekeeping ------------------------------------------------------------------------

    def evict(self, max_bytes: int | None = None) -> int:
        """Delete least recently used entries until the total is within the cap; returns how many."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        entries = self._entries()
        total = sum(st.st_size for _, st in entries)
        removed = 0
        for path, st in sorted(entries, key=lambda e: (e[1].st_mtime_ns, e[0].name)):
            if total <= cap:
                break
            self._discard(path)
            total -= st.st_size
            removed += 1
        return removed

    def prune(self) -> int:
        """Remove unreadable entries and stale temporary files, then evict to the cap."""
        removed = 0
        if self.folder.is_dir():
            now = time.time()
            for sub in self.folder.iterdir():
                if not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    try:
                        if f.name.endswith(".tmp"):
                            if now - f.stat().st_mtime > STALE_TMP_SECONDS:
                                f.unlink()
                                removed += 1
                        elif f.name.endswith(SUFFIX):
                            key = f.name[: -len(SUFFIX)]
                            if self.get(key, touch=False) is None:
                                removed += 1
                    except OSError:
                        pass
        return removed + self.evict()

    def clear(self) -> int:
        removed = 0
        for path, _ in self._entries():
            self._discard(path)
            removed += 1
        return removed

    def stats(self) -> CacheStats:
        entries = self._entries()
        times = [st.st_mtime for _, st in entries]
        return CacheStats(
            entries=len(entries),
            bytes=sum(st.st_size for _, st in entries),
            oldest=min(times) if times else None,
            newest=max(times) if times else None,
        )


@dataclass(frozen=True)
class ChunkStore:
    """The cache as a render uses it: a prompt chunk's unweighted (77, dim) encoder output, keyed
    by the chunk (its ids and embeddings, ``Chunk.key``/``fix_signature``) and the clip skip for
    one encoder, tokenizer and precision."""

    cache: EmbeddingCache
    encoder_id: str
    tokenizer_id: str
    precision: str
    model_hash: Callable[[], str]
    """The model hash to label new entries with ("" while unknown: never waited for)."""

    def key(self, chunk, clip_skip: int) -> str:
        return cache_key(self.encoder_id, self.tokenizer_id, chunk.ids, precision=self.precision,
                         clip_skip=clip_skip, fixes=chunk.fix_signature)

    def found(self, chunks, clip_skip: int, dim: int) -> dict:
        """The cached output of each of ``chunks`` the cache has, by chunk key."""
        out = {}
        for c in chunks:
            if c.key not in out:
                emb = self.cache.get(self.key(c, clip_skip), dim)
                if emb is not None and emb.shape[0] == len(c.ids):
                    out[c.key] = emb
        return out

    def put(self, chunks, outputs: dict, labels: dict, clip_skip: int) -> None:
        """Store ``outputs[chunk.key]`` for each chunk (``labels[chunk.key]``: the text it came
        from, for ``sdterm cache``); OSError when the cache can't be written."""
        entries = {self.key(c, clip_skip): (outputs[c.key], labels.get(c.key, "")) for c in chunks}
        self.cache.put_many(entries, model_hash=self.model_hash())
