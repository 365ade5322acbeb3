"""`sdterm doctor`: what this machine has for sdterm, each line OK or the problem and its fix."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from ..units import format_bytes


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    """'ok', 'warn' or 'fail'."""
    detail: str
    fix: str = ""


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", "ok" if ok else "fail", platform.python_version(), "" if ok else "sdterm needs Python 3.10 or newer")


def check_torch() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", "fail", "not installed", "pip install torch (a CUDA build for a GPU)")]
    out = [Check("torch", "ok", torch.__version__)]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        out.append(Check("cuda", "ok", f"CUDA {torch.version.cuda}, {name}, {format_bytes(free)} free of {format_bytes(total)}"))
        if total < 3 * 2**30:
            out.append(Check("gpu memory", "warn", f"{format_bytes(total)} on the card",
                             "use --vram-budget to leave room for the desktop; sdterm streams the U-Net below 1.6 GiB"))
    else:
        built = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        out.append(Check("cuda", "warn", f"no CUDA GPU visible ({built})",
                         "renders run on the CPU (slow); on a GPU machine install the torch build for its CUDA"))
    return out


def check_models() -> list[Check]:
    from .. import paths
    from ..engine.loading.checkpoint import CheckpointError, open_checkpoint
    from ..engine.loading.file_hash import remembered_sha256, short_hash
    from ..resolve import find_models, models_dir, user_config

    out = []
    try:
        cfg = user_config()
        out.append(Check("settings", "ok", str(paths.user_config_file()) + ("" if paths.user_config_file().is_file() else " (not present: defaults)")))
    except (ConfigError, OSError) as exc:  # a broken settings file is a finding (a bug in sdterm is not)
        out.append(Check("settings", "fail", str(exc), f"fix or remove {paths.user_config_file()}"))
        cfg = None
    candidates = find_models()
    if cfg is not None and cfg.defaults.model:
        from pathlib import Path

        candidates.insert(0, Path(cfg.defaults.model).expanduser())
    if not candidates:
        out.append(Check("models", "warn", f"none in {models_dir()}",
                         "sdterm download sd-v1-5, or pass --model PATH; sdterm --demo works without one"))
    for path in candidates:
        try:
            ckpt = open_checkpoint(path)
            file = ckpt.path
            ckpt.close()
            digest = remembered_sha256(file, paths.hash_memo_file())
            out.append(Check("model", "ok", f"{path} (hash {short_hash(digest)})"))
        except (CheckpointError, OSError) as exc:
            out.append(Check("model", "fail", str(exc), "re-download it (sdterm download) or remove it"))
    return out


def check_tokenizer() -> Check:
    from .. import paths
    from ..engine.prompt.tokenizer import TOKENIZER_REPO, find_tokenizer

    found = find_tokenizer(None, paths.data_dir())
    if found:
        return Check("tokenizer", "ok", str(found))
    return Check("tokenizer", "warn", "the CLIP tokenizer is not downloaded yet",
                 f"sdterm download fetches it ({TOKENIZER_REPO}); models in folders with tokenizer/ don't need it")


def check_cache() -> Check:
    from ..resolve import open_cache

    try:
        cache = open_cache()
    except (ConfigError, OSError) as exc:
        return Check("cache", "fail", str(exc), "fix the cache section of sdterm.yaml")
    if cache is None:
        return Check("cache", "warn", "prompt-embedding cache disabled in sdterm.yaml", "set cache.enabled: true")
    st = cache.stats()
    probe = cache.folder if cache.folder.exists() else cache.folder.parent
    writable = not probe.exists() or os.access(probe, os.W_OK)
    detail = f"{cache.folder}: {st.entries} entries, {format_bytes(st.bytes)} of {format_bytes(cache.max_bytes)}"
    if not writable:
        return Check("cache", "warn", detail + " (not writable)", "renders still work, without the cache; check the folder's permissions")
    return Check("cache", "ok", detail)


def check_terminal() -> Check:
    if not sys.stdout.isatty():
        return Check("terminal", "warn", "stdout is not a terminal: graphics not detected", "run sdterm doctor in the terminal you use")
    from textual_image import renderable

    kind = renderable.Image.__module__.rsplit(".", 1)[-1]
    names = {"tgp": "Kitty graphics", "sixel": "Sixel", "halfcell": "half-block cells", "unicode": "Unicode blocks"}
    detail = names.get(kind, kind)
    if os.environ.get("TMUX"):
        return Check("terminal", "ok" if kind in ("tgp", "sixel") else "warn", f"{detail} (inside tmux)",
                     "" if kind in ("tgp", "sixel") else
                     "for real images in tmux: set -g allow-passthrough on, then sdterm --image-protocol kitty")
    if kind in ("tgp", "sixel"):
        return Check("terminal", "ok", detail)
    return Check("terminal", "warn", detail, "a terminal with Kitty graphics or Sixel (kitty, WezTerm, foot, iTerm2) shows real pixels")


def run_checks() -> list[Check]:
    checks = [check_python(), *check_torch(), *check_models(), check_tokenizer(), check_cache(), check_terminal()]
    return checks


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``sdterm doctor`` on ``parser.add_subparsers(...)``; returns its parser."""
    p = sub.add_parser("doctor", help="check Python, torch/CUDA, GPU memory, models, tokenizer, cache and terminal")
    p.add_argument("--json", action="store_true", help="one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    """``sdterm doctor``: every check, as lines or one JSON object; exit 1 when one fails."""
    checks = run_checks()
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks]}))
    else:
        label = {"ok": " OK ", "warn": "WARN", "fail": "FAIL"}
        for c in checks:
            print(f"[{label[c.status]}] {c.name:<10} {c.detail}")
            if c.fix:
                print(f"       {'':<10} fix: {c.fix}")
    return 1 if any(c.status == "fail" for c in checks) else 0
