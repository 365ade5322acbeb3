"""The engine the command line's flags ask for (``--device``, ``--vram-budget``, ``--no-cache``),
shared by ``sdterm generate`` and the app."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..resolve import open_cache
from ..units import parse_budget


def make_engine(source, args: argparse.Namespace):
    """The engine for ``source`` with the user's device, cache and budget; a missing tokenizer
    is reported now, before any work starts (or the screen opens)."""
    from .. import paths
    from ..engine.pipeline import Engine
    from ..engine.memory.placement import resolve_device

    try:  # an unusable --device is the user's to fix (the engine says so with a RuntimeError)
        resolve_device(args.device)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    engine = Engine(
        source,
        args.device,
        data_dir=paths.data_dir(),
        hash_memo=paths.cache_dir() / "model-hashes.json",
        cache=open_cache(args.no_cache),
        budget=parse_budget(args.vram_budget, "--vram-budget"),
    )
    engine.models.tokenizer
    return engine
