"""The engine the command line's flags ask for (``--device``, ``--vram-budget``, ``--no-cache``,
``--threads``, ``--embeddings``, ``--lora-dir``, ``--vae``) and the ``--lora NAME:W`` tags, shared
by ``sdterm generate`` and the app."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ..resolve import embedding_folders, lora_folders, open_cache, resolve_vae
from ..units import parse_budget
from ..options import whole_number


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads (``defaults.threads`` in sdterm.yaml; else torch's default)."""
    p.add_argument("--threads", metavar="N", type=whole_number, default=None,
                   help="CPU threads for torch (default: defaults.threads in sdterm.yaml, else torch's default)")


def add_graphs_option(p: argparse.ArgumentParser) -> None:
    """``--no-cuda-graphs``: the U-Net eager, kernel by kernel (``defaults.cuda_graphs`` in sdterm.yaml)."""
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="run the U-Net kernel by kernel instead of replaying it as a CUDA graph (slower, the "
                        "same pixels; default: defaults.cuda_graphs in sdterm.yaml)")


def add_embeddings_option(p: argparse.ArgumentParser) -> None:
    """``--embeddings DIR``: the textual-inversion embeddings folder (A1111's ``--embeddings-dir``)."""
    p.add_argument("--embeddings", metavar="DIR", default=None,
                   help="folder of textual-inversion embeddings (.pt/.safetensors/.bin), used by the word "
                        "that is the file's name (default: defaults.embeddings_dir in sdterm.yaml, else "
                        "the data folder's embeddings)")


def lora_choice(text: str) -> tuple[str, float]:
    """``--lora NAME:W`` (``NAME`` alone: weight 1) -> (name, weight)."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        name, weight = text, "1"
    try:
        w = float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:WEIGHT such as detail:0.8, got {text!r}") from None
    if not name.strip() or any(c in name for c in "<>:") or w != w or abs(w) == float("inf"):
        raise argparse.ArgumentTypeError(f"expected NAME:WEIGHT such as detail:0.8, got {text!r}")
    return name.strip(), w


def add_addon_options(p: argparse.ArgumentParser) -> None:
    """``--lora NAME:W`` (repeatable), ``--lora-dir DIR`` and ``--vae PATH``."""
    p.add_argument("--lora", metavar="NAME:W", type=lora_choice, action="append", default=None,
                   help="add <lora:NAME:W> to the prompt of each render (repeatable; W defaults to 1)")
    p.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="folder of LoRA files (.safetensors/.pt), used by <lora:NAME:W> with the file's name "
                        "(default: defaults.lora_dir in sdterm.yaml, else the data folder's loras)")
    p.add_argument("--vae", metavar="PATH", default=None,
                   help="decode with this VAE file (.safetensors/.ckpt/.pt) instead of the checkpoint's own; "
                        "a bare NAME is a file in the data folder's vae folder (default: defaults.vae)")


def with_loras(prompt: str, loras: list[tuple[str, float]] | None) -> str:
    """``prompt`` with a ``<lora:NAME:W>`` tag for each ``--lora`` at its end (as A1111 writes
    them, so the image's infotext carries them)."""
    from ..prompt_syntax import lora_tag

    tags = [lora_tag(name, weight) for name, weight in loras or []]
    return " ".join(part for part in (prompt, *tags) if part)


def apply_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when the user set it; torch's default otherwise."""
    if threads is None or threads == 0:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def taesd_file(data_dir: Path) -> Path | None:
    """TAESD's decoder for previews where ``sdterm download taesd`` put it; None when it isn't there."""
    from ..download.catalog import TAESD

    path = Path(data_dir) / TAESD.dest
    return path if path.is_file() else None


def start_driver(args: argparse.Namespace) -> None:
    """Start CUDA's driver and the device's context on a thread unless ``args.device`` is the CPU:
    called by a command about to render before it imports torch, so that they run beside the
    import (``engine/memory/cuda_driver.py``; no torch is imported here)."""
    if args.device != "cpu":
        from ..engine.memory.cuda_driver import start_driver as start

        start(0)  # --device cuda and auto: the first device


def start_device(args: argparse.Namespace) -> None:
    """Start CUDA on a thread unless ``args.device`` is the CPU: called by a command about to
    render as soon as torch is imported, so the driver, the device's context and the process's
    first calls (``engine/memory/cuda_start.py``) run beside the model's opening and the engine's
    set-up (``--device auto`` finds out there whether there is a GPU). An unusable ``--device`` is
    left to :func:`make_engine` to report."""
    from ..engine.memory.cuda_start import start_cuda

    if args.device != "cpu":
        start_cuda("cuda", first_calls=True)


def make_engine(source, args: argparse.Namespace):
    """The engine for ``source`` with the user's device, cache, budget, embeddings and LoRA folders
    and VAE file (``args.embeddings``, ``args.lora_dir``, ``args.vae``, filled from the settings by
    ``apply_defaults``); a missing tokenizer is
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
    lora_dirs, optional_lora_dirs = lora_folders(getattr(args, "lora_dir", None))
    engine = Engine(
        source,
        args.device,
        data_dir=paths.data_dir(),
        hash_memo=paths.hash_memo_file(),
        model_cache=paths.model_cache_dir(),
        cache=open_cache(args.no_cache),
        budget=parse_budget(args.vram_budget, "--vram-budget"),
        embedding_dirs=embedding_dirs,
        optional_embedding_dirs=optional_dirs,
        lora_dirs=lora_dirs,
        optional_lora_dirs=optional_lora_dirs,
        vae=resolve_vae(getattr(args, "vae", None)),
        taesd=taesd_file(paths.data_dir()),
        cuda_graphs=getattr(args, "cuda_graphs", None) is not False,
    )
    engine.models.token_memo = not args.no_cache  # --no-cache: no prompt text in the cache folder at all
    engine.models.tokenizer
    return engine
