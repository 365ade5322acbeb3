"""The engine the command line's flags ask for (``--device``, ``--vram-budget``, ``--no-cache``,
``--threads``, ``--embeddings``), shared by ``sdterm generate`` and the app."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..resolve import embedding_folders, open_cache
from ..units import parse_budget
from ..options import whole_number


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads (``defaults.threads`` in sdterm.yaml; else torch's default)."""
    p.add_argument("--threads", metavar="N", type=whole_number, default=None,
                   help="CPU threads for torch (default: defaults.threads in sdterm.yaml, else torch's default)")


def add_embeddings_option(p: argparse.ArgumentParser) -> None:
    """``--embeddings DIR``: the textual-inversion embeddings folder (A1111's ``--embeddings-dir``)."""
    p.add_argument("--embeddings", metavar="DIR", default=None,
                   help="folder of textual-inversion embeddings (.pt/.safetensors/.bin), used by the word "
                        "that is the file's name (default: defaults.embeddings_dir in sdterm.yaml, else "
                        "the data folder's embeddings)")


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when the user set it; torch's default otherwise."""
    if threads is None or threads == 0:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def make_engine(source, args: argparse.Namespace):
    """The engine for ``source`` with the user's device, cache, budget and embeddings folder
    (``args.embeddings``, filled from the settings by ``apply_defaults``); a missing tokenizer is
    reported now, before any work starts (or the screen opens)."""
    from .. import paths
    from ..engine.pipeline import Engine
    from ..engine.memory.placement import resolve_device

    try:  # an unusable --device is the user's to fix (the engine says so with a RuntimeError)
        resolve_device(args.device)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    apply_threads(getattr(args, "threads", None))
    embedding_dirs, optional_dirs = embedding_folders(getattr(args, "embeddings", None))
    engine = Engine(
        source,
        args.device,
        data_dir=paths.data_dir(),
        hash_memo=paths.cache_dir() / "model-hashes.json",
        cache=open_cache(args.no_cache),
        budget=parse_budget(args.vram_budget, "--vram-budget"),
        embedding_dirs=embedding_dirs,
        optional_embedding_dirs=optional_dirs,
    )
    engine.models.token_memo = not args.no_cache  # --no-cache: no prompt text in the cache folder at all
    engine.models.tokenizer
    return engine
