"""``sdterm cache``: the prompt-embedding cache's folder and figures, and the model cache's packs;
clear them, or prune them."""

from __future__ import annotations

import argparse
import json

from ..errors import UserError
from ..resolve import open_cache, user_config
from ..units import format_bytes


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``sdterm cache`` on ``parser.add_subparsers(...)``; returns its parser."""
    cache = sub.add_parser("cache", help="the prompt-embedding and model caches: path, stats, clear, prune")
    cache.add_argument("action", nargs="?", default="stats", choices=("path", "stats", "clear", "prune"),
                       help="what to do (default: stats)")
    cache.add_argument("--json", action="store_true", help="stats as one JSON object")
    return cache


def run(args: argparse.Namespace) -> int:
    """``sdterm cache [ACTION]`` (``stats`` when left out)."""
    import time

    from .. import paths
    from ..engine.embedding_cache import EmbeddingCache
    from ..engine.loading import pack_folder

    packs = paths.model_cache_dir()

    settings = user_config().cache
    cache = open_cache() or EmbeddingCache(paths.embedding_cache_dir(settings.dir))
    if args.action == "path":
        print(cache.folder)
        return 0
    try:
        if args.action == "clear":
            print(f"removed {cache.clear()} entries from {cache.folder}")
            memos = paths.cache_dir() / "prompt-tokens"  # the text -> token ids memo (prompts too)
            removed = 0
            for memo in memos.glob("*.json") if memos.is_dir() else ():
                memo.unlink()
                removed += 1
            if removed:
                print(f"removed {removed} prompt token memo(s) from {memos}")
            print(f"removed {pack_folder.clear(packs)} model pack(s) from {packs}")
            return 0
        if args.action == "prune":
            print(f"removed {cache.prune()} entries (unreadable, stale or over the cap) from {cache.folder}")
            print(f"removed {pack_folder.prune(packs)} model pack(s) (unreadable, or their checkpoint changed "
                  f"or is gone) from {packs}")
            return 0
    except OSError as exc:
        raise UserError(f"cannot change {cache.folder} ({exc.strerror or exc})") from None
    st = cache.stats()
    n_packs, pack_bytes = pack_folder.stats(packs)

    def when(t: float | None) -> str | None:
        return None if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    if args.json:
        print(json.dumps({"path": str(cache.folder), "entries": st.entries, "bytes": st.bytes,
                          "max_bytes": cache.max_bytes, "oldest": when(st.oldest), "newest": when(st.newest),
                          "model_packs": {"path": str(packs), "count": n_packs, "bytes": pack_bytes}}))
    else:
        print(f"path     {cache.folder}")
        print(f"entries  {st.entries}")
        print(f"size     {format_bytes(st.bytes)} of {format_bytes(cache.max_bytes)}")
        if st.entries:
            print(f"oldest   {when(st.oldest)}")
            print(f"newest   {when(st.newest)}")
        print(f"models   {n_packs} pack(s), {format_bytes(pack_bytes)} in {packs}")
    return 0
