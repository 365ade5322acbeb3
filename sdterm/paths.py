"""Where sdterm keeps things (platformdirs), each overridable by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

APP = "sdterm"


def _dir(env: str, kind: str) -> Path:
    override = os.environ.get(env)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(getattr(platformdirs, f"user_{kind}_dir")(APP, appauthor=False))


def cache_dir() -> Path:
    """Prompt embeddings, remembered model hashes: safe to delete. ``SDTERM_CACHE_DIR``."""
    return _dir("SDTERM_CACHE_DIR", "cache")


def data_dir() -> Path:
    """Models, tokenizer files, history. ``SDTERM_DATA_DIR``."""
    return _dir("SDTERM_DATA_DIR", "data")


def config_dir() -> Path:
    """The user's sdterm.yaml. ``SDTERM_CONFIG_DIR``."""
    return _dir("SDTERM_CONFIG_DIR", "config")


def default_outdir() -> Path:
    """Where images go when no --outdir is given: ./outputs, beside where the user works."""
    return Path(os.environ.get("SDTERM_OUTDIR", "outputs"))


def embeddings_dir() -> Path:
    """Textual-inversion embeddings when no --embeddings or defaults.embeddings_dir names a
    folder: ``embeddings`` in the data folder (may be missing)."""
    return data_dir() / "embeddings"


def lora_dir() -> Path:
    """LoRA files when no --lora-dir or defaults.lora_dir names a folder: ``loras`` in the data
    folder (may be missing)."""
    return data_dir() / "loras"


def vae_dir() -> Path:
    """Standalone VAE files: ``vae`` in the data folder; a bare name given to --vae or
    defaults.vae means a file here."""
    return data_dir() / "vae"


def embedding_cache_dir(configured: str = "") -> Path:
    """The prompt-embedding cache: SDTERM_CACHE_DIR/embeddings, else the configured folder, else
    the platformdirs cache dir."""
    if configured and not os.environ.get("SDTERM_CACHE_DIR"):
        return Path(configured).expanduser()
    return cache_dir() / "embeddings"


def user_config_file() -> Path:
    return config_dir() / "sdterm.yaml"


def hash_memo_file() -> Path:
    """The hash memo: each checkpoint's digests at its size and mtime (``file_hash.py``)."""
    return cache_dir() / "model-hashes.json"


def model_cache_dir() -> Path:
    """The model cache: checkpoints converted to the run dtype in their placement layout (a few
    packs of about the model's fp16 size each; ``sdterm cache clear`` removes them)."""
    return cache_dir() / "models"
