"""The user's settings: ``sdterm.yaml`` in the platformdirs config dir (``SDTERM_CONFIG_DIR``).

Typed dataclasses, each field documented where it is declared, and :func:`load_user_config`, the
one reader of the settings file. Values are checked by the same validators as the command line
(:meth:`sdterm.params.Params.validated`, :func:`sdterm.units.parse_size`). Where the settings
meet the command line's flags is ``sdterm/resolve.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .config import from_mapping, read_yaml
from .errors import ConfigError
from .params import Params
from .samplers import sampler_name
from .units import parse_size

IMAGE_PROTOCOLS = ("auto", "kitty", "sixel", "halfcell", "unicode")


@dataclass(frozen=True)
class CacheSettings:
    dir: str = ""
    """Embedding cache folder; empty means the platformdirs cache dir (or SDTERM_CACHE_DIR)."""
    max_size: str = "256M"
    """Cap on the embedding cache (256 MiB); least recently used entries are evicted beyond it."""
    enabled: bool = True
    """False renders without the embedding cache."""


@dataclass(frozen=True)
class Defaults:
    """What the app and ``generate`` use when a flag is left out."""

    model: str = ""
    """Checkpoint file or model folder; empty: the one model in the models folder, if exactly one."""
    outdir: str = ""
    """Where images go; empty: ./outputs."""
    embeddings_dir: str = ""
    """Folder of textual-inversion embeddings (.pt/.safetensors/.bin; a file's name is the word a
    prompt uses), instead of the embeddings folder in the data folder (as ``--embeddings DIR``).
    Empty: that default folder, if it exists; a folder named here must exist."""
    lora_dir: str = ""
    """Folder of LoRA files (.safetensors/.pt; a file's name is the NAME of ``<lora:NAME:W>``),
    instead of the loras folder in the data folder (as ``--lora-dir DIR``). Empty: that default
    folder, if it exists; a folder named here must exist."""
    vae: str = ""
    """A standalone VAE file to decode with instead of the checkpoint's own (as ``--vae PATH``):
    a path (``~`` expanded) or a bare file name in the vae folder of the data folder. Empty: the
    checkpoint's own VAE."""
    steps: int = 50
    cfg: float = 7.5
    width: int = 512
    height: int = 512
    budget: str = ""
    """VRAM budget such as 2G; empty: the device's free memory minus a margin."""
    image_protocol: str = "auto"
    """auto, kitty, sixel, halfcell or unicode."""
    threads: int = 0
    """CPU threads for torch (torch.set_num_threads); 0: torch's own default."""
    history: bool = True
    """False: ``sdterm generate`` records nothing in the history (as ``--no-history``)."""
    cuda_graphs: bool = True
    """False: the U-Net runs kernel by kernel, never replayed as a CUDA graph (as
    ``--no-cuda-graphs``): slower, the same pixels; for ruling graphs out when a driver misbehaves."""


@dataclass(frozen=True)
class DraftSettings:
    """The app's draft renders: few steps with an LCM-LoRA, for "nudge the seed, look again"."""

    sampler: str = "LCM"
    """The draft sampler, by its AUTOMATIC1111 name (``sdterm/samplers.py``; any case, an alias)."""
    steps: int = 4
    """Sampling steps of a draft (LCM: 4 to 8)."""
    cfg: float = 1.5
    """Guidance scale of a draft (LCM: 1 to 2; 1 is one U-Net pass per step)."""
    lora: str = ""
    """An LCM-LoRA's name in the loras folder (such as ``lcm-lora-sdv1-5``), added at weight 1 to
    draft renders; empty: none."""


@dataclass(frozen=True)
class UserConfig:
    cache: CacheSettings = field(default_factory=CacheSettings)
    defaults: Defaults = field(default_factory=Defaults)
    draft: DraftSettings = field(default_factory=DraftSettings)


def load_user_config(path: Path) -> UserConfig:
    """Read the user's sdterm.yaml; a missing file means defaults. ConfigError naming the file."""
    if not path.is_file():
        return UserConfig()
    raw = read_yaml(path, "settings file")
    try:
        cfg = from_mapping(UserConfig, raw or {}, "sdterm.yaml")
        parse_size(cfg.cache.max_size, "cache.max_size")
        d = cfg.defaults
        # The same validator as the command line and the app's commands.
        Params(steps=d.steps, cfg=d.cfg, width=d.width, height=d.height).validated()
        if d.budget:
            parse_size(d.budget, "defaults.budget")
        for key in ("embeddings_dir", "lora_dir", "vae"):
            if "\0" in getattr(d, key):
                raise ConfigError(f"defaults.{key}: a file or folder name can't hold a NUL character")
        if not isinstance(d.threads, int) or isinstance(d.threads, bool) or d.threads < 0:
            raise ConfigError(f"defaults.threads must be a whole number >= 0 (0: torch's default), got {d.threads!r}")
        if d.image_protocol not in IMAGE_PROTOCOLS:
            raise ConfigError(f"defaults.image_protocol must be auto, kitty, sixel, halfcell or unicode, got {d.image_protocol!r}")
        cfg = dataclasses.replace(cfg, draft=_validated_draft(cfg.draft))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg


def _validated_draft(draft: DraftSettings) -> DraftSettings:
    """``draft`` with its sampler's canonical name, checked by the command line's validator."""
    name = sampler_name(draft.sampler) if isinstance(draft.sampler, str) else None
    if name is None:
        raise ConfigError(f"draft.sampler: unknown sampler {draft.sampler!r} (try LCM, Euler a, DPM++ 2M)")
    try:
        Params(sampler=name, steps=draft.steps, cfg=draft.cfg).validated()
    except ConfigError as exc:
        raise ConfigError(f"draft: {exc}") from None
    if "\0" in draft.lora or "/" in draft.lora or "\\" in draft.lora:
        raise ConfigError(f"draft.lora: a LoRA's name in the loras folder, not a path: {draft.lora!r}")
    return dataclasses.replace(draft, sampler=name)
