"""``sdterm download``: its flags (``add_parser``) and ``run``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import EXIT_CANCELLED
from .catalog import DEFAULT_MODEL, EXTRAS, MODELS, download_extra, download_model, download_tokenizer
from .explain import size_text
from .hub import partial_files


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``sdterm download`` on ``parser.add_subparsers(...)``; returns its parser."""
    p = sub.add_parser(
        "download",
        help="fetch an SD v1 checkpoint and the CLIP tokenizer from the Hugging Face hub",
        description="Download a Stable Diffusion v1 checkpoint (verified by sha256, resumable) into the models "
        "folder, and the CLIP tokenizer beside it. HF_TOKEN / `hf auth login` and HF_ENDPOINT are honoured.",
    )
    listing = "; ".join(f"{s.name}: {s.repo}/{s.filename}" for s in MODELS.values())
    extras = "; ".join(f"{s.name}: {s.repo}/{s.filename} ({s.note})" for s in EXTRAS.values())
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=(*MODELS, *EXTRAS), metavar="MODEL",
                   help=f"which checkpoint (default {DEFAULT_MODEL}); {listing}; or {extras}")
    p.add_argument("--dir", metavar="DIR", help="where the checkpoint goes (default: the data folder's models/)")
    p.add_argument("--force", action="store_true", help="download again even when the files are there")
    return p


def run(args: argparse.Namespace) -> int:
    """``sdterm download``: the checkpoint, then the tokenizer; the checkpoint's path on stdout."""
    from .. import paths

    if args.model in EXTRAS:
        return _extra(args, paths.data_dir())
    spec = MODELS[args.model]
    data = paths.data_dir()
    default_dir = data / "models"
    dest_dir = Path(args.dir).expanduser() if args.dir else default_dir
    dest = dest_dir / spec.filename
    had = dest.is_file() and not args.force
    print(f"{spec.name}: {spec.repo} {spec.filename}; licence {spec.licence}", file=sys.stderr)
    if spec.note:
        print(f"note: {spec.note}", file=sys.stderr)
    try:
        path = download_model(spec.name, dest_dir, force=args.force)
        print(f"{'already there, ' if had else ''}sha256 ok: {path}", file=sys.stderr)
        if spec.sha256:
            from ..engine.loading.file_hash import remember_sha256

            remember_sha256(path, spec.sha256, paths.hash_memo_file())
        tok = download_tokenizer(data, force=args.force)
    except KeyboardInterrupt:
        kept = partial_files(dest_dir, spec.filename)
        tail = (f"; {size_text(kept[0].stat().st_size)} kept in {kept[0]}: run the same command again to resume"
                if kept else "")
        print(f"sdterm: interrupted{tail}", file=sys.stderr)
        return EXIT_CANCELLED
    print(f"tokenizer: {tok}", file=sys.stderr)
    if dest_dir.resolve() != default_dir.resolve():
        print(f"outside the models folder: use it with --model {path}", file=sys.stderr)
    print(path)
    return 0


def _extra(args: argparse.Namespace, data: Path) -> int:
    """``sdterm download taesd``: the file into the data folder (``--dir`` is for checkpoints)."""
    spec = EXTRAS[args.model]
    print(f"{spec.name}: {spec.repo} {spec.filename}; licence {spec.licence}", file=sys.stderr)
    if args.dir:
        print(f"note: --dir is for checkpoints; {spec.name} goes to the data folder", file=sys.stderr)
    try:
        path = download_extra(spec.name, data, force=args.force)
    except KeyboardInterrupt:
        print("sdterm: interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_CANCELLED
    print(path)
    return 0
