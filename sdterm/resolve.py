"""What the user meant: which model, which settings, from flags, sdterm.yaml and the models folder;
the embedding cache, the embeddings and LoRA folders and the VAE file as configured, and the
random-weights model source for measurements.

Precedence: a flag on the command line, then ``defaults:`` in the user's sdterm.yaml, then the
built-in defaults. ``--model`` may be left out when the settings name a default model or when
exactly one model sits in the models folder (where ``sdterm download`` puts them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import paths
from .errors import ConfigError
from .settings import UserConfig, load_user_config

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def user_config() -> UserConfig:
    return load_user_config(paths.user_config_file())


def models_dir() -> Path:
    return paths.data_dir() / "models"


def find_models(folder: Path | None = None) -> list[Path]:
    """Checkpoint files and model folders (with model.safetensors/model.ckpt) in the models folder."""
    folder = folder or models_dir()
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix in CHECKPOINT_SUFFIXES:
            found.append(entry)
        elif entry.is_dir() and any((entry / f"model{s}").is_file() for s in CHECKPOINT_SUFFIXES):
            found.append(entry)
    return found


def resolve_model(given: str | None, cfg: UserConfig) -> str:
    """--model, else the settings' default model, else the only model in the models folder."""
    if given:
        return given
    if cfg.defaults.model:
        return cfg.defaults.model
    found = find_models()
    if len(found) == 1:
        return str(found[0])
    if not found:
        raise ConfigError(
            "no model given: pass --model PATH, run `sdterm download sd-v1-5`, or try `sdterm --demo`"
        )
    names = ", ".join(p.name for p in found[:5])
    raise ConfigError(
        f"{len(found)} models in {models_dir()} ({names}): pick one with --model, "
        f"or set defaults.model in {paths.user_config_file()}"
    )


def demo_model_dir() -> Path:
    """The demo model in the data folder, written on first use."""
    from .engine.loading.demo import write_demo_model

    folder = paths.data_dir() / "demo-model"
    if not all((folder / f).exists() for f in ("model.safetensors", "config.yaml", "tokenizer/vocab.json")):
        write_demo_model(folder)
    return folder


DEMO_DEFAULTS = {"steps": 20, "width": 256, "height": 256}
"""The demo renders smaller and shorter than a real model: its images are noise anyway."""


def apply_defaults(args: argparse.Namespace, cfg: UserConfig, *, demo: bool = False) -> None:
    """Fill every render flag left out (None) from the settings, then the built-in defaults."""
    d = cfg.defaults
    for name in ("steps", "cfg", "width", "height"):
        if getattr(args, name, None) is None:
            value = getattr(d, name)
            if demo and name in DEMO_DEFAULTS and value == getattr(type(d)(), name):
                value = DEMO_DEFAULTS[name]
            setattr(args, name, value)
    if getattr(args, "vram_budget", None) is None and d.budget:
        args.vram_budget = d.budget
    if getattr(args, "outdir", None) is None and d.outdir:
        args.outdir = d.outdir
    if getattr(args, "embeddings", None) is None and d.embeddings_dir:
        args.embeddings = d.embeddings_dir
    if getattr(args, "lora_dir", None) is None and d.lora_dir:
        args.lora_dir = d.lora_dir
    if getattr(args, "vae", None) is None and d.vae:
        args.vae = d.vae
    if getattr(args, "image_protocol", None) is None:
        args.image_protocol = d.image_protocol
    if getattr(args, "threads", None) is None and d.threads:
        args.threads = d.threads
    if getattr(args, "history", None) is None:
        args.history = d.history
    if getattr(args, "cuda_graphs", None) is None:
        args.cuda_graphs = d.cuda_graphs


def embedding_folders(given: str | None) -> tuple[list[Path], list[Path]]:
    """(the embedding folders, those of them that may be missing): the folder the user named
    (``--embeddings``, else ``defaults.embeddings_dir``; it must exist, as A1111's
    ``--embeddings-dir``), else the data folder's ``embeddings``, which may be missing silently."""
    if given:
        return [Path(given).expanduser()], []
    default = paths.embeddings_dir()
    return [default], [default]


def lora_folders(given: str | None) -> tuple[list[Path], list[Path]]:
    """(the LoRA folders, those of them that may be missing): as :func:`embedding_folders`, with
    ``--lora-dir``, else ``defaults.lora_dir`` (it must exist), else the data folder's ``loras``."""
    if given:
        return [Path(given).expanduser()], []
    default = paths.lora_dir()
    return [default], [default]


VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")


def resolve_vae(given: str | None) -> Path | None:
    """The VAE file ``--vae`` (else ``defaults.vae``, filled in by :func:`apply_defaults`) names:
    a path (``~`` expanded), or a bare NAME (with or without its extension) of a file in the vae
    folder of the data folder. None: the checkpoint's own VAE. Whether the file is there and a
    usable VAE is the engine's to say (one line naming it)."""
    if not given:
        return None
    path = Path(given).expanduser()
    if path.exists() or given.startswith("~") or len(path.parts) > 1:
        return path
    folder = paths.vae_dir()
    for cand in (folder / given, *(folder / f"{given}{s}" for s in VAE_SUFFIXES)):
        if cand.is_file():
            return cand
    return folder / given


def open_cache(disabled: bool = False):
    """The embedding cache as the user configured it, or None when disabled."""
    from .engine.embedding_cache import EmbeddingCache
    from .units import parse_size

    settings = user_config().cache
    if disabled or not settings.enabled:
        return None
    return EmbeddingCache(paths.embedding_cache_dir(settings.dir), parse_size(settings.max_size, "cache.max_size"))


def random_weights_source(config: str | None):
    """Full-size SD v1 modules (or ``config``'s architecture) with random weights, and a stand-in
    tokenizer: for memory and speed measurements without a checkpoint."""
    from .config import default_config_path, load_model_config
    from .engine.loading.demo import write_tokenizer
    from .engine.pipeline import ModelSource

    cfg = load_model_config(config or default_config_path())
    tok_dir = paths.cache_dir() / "random-weights-tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        write_tokenizer(tok_dir)
    return ModelSource(None, cfg, f"{cfg.name}-random", tok_dir)
