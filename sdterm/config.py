"""Typed settings: model architecture, sampler parameters and their validation.

This is the one place that reads YAML (through omegaconf, imported lazily so the engine stays
importable without it). Every field is documented where it is declared; defaults for the real
architecture live in ``configs/sd-v1.yaml``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A settings file or a parameter is invalid; the message is one line meant for the user."""


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    """Latent channels going in (4 for SD v1 text-to-image; 9 would be inpainting)."""
    out_channels: int = 4
    """Latent channels predicted (the noise estimate)."""
    model_channels: int = 320
    """Channels of the first level; level i has model_channels * channel_mult[i]."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per resolution level; one downsample between consecutive levels."""
    num_res_blocks: int = 2
    """Residual blocks per level on the way down (the way up has one more)."""
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    """Downsampling factors (1, 2, 4, ...) at which a spatial transformer follows each res block."""
    num_heads: int = 8
    """Attention heads in every spatial transformer (head width = channels / heads)."""
    transformer_depth: int = 1
    """Transformer blocks per spatial transformer."""
    context_dim: int = 768
    """Width of the text embedding used by cross-attention (the text encoder's hidden size)."""


@dataclass(frozen=True)
class VAEConfig:
    z_channels: int = 4
    """Latent channels."""
    ch: int = 128
    """Base channels of the decoder; level i has ch * ch_mult[i]."""
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; len(ch_mult) - 1 upsamplings (8x for SD v1)."""
    num_res_blocks: int = 2
    """Residual blocks per level in the encoder; the decoder has one more."""
    out_ch: int = 3
    """Image channels."""
    scale_factor: float = 0.18215
    """Latents are divided by this before decoding (SD v1's latent scaling)."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    """Tokens per encoder pass, BOS and EOS included (75 prompt tokens per chunk)."""
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    """First beta of the scaled-linear schedule (linear in sqrt(beta))."""
    beta_end: float = 0.012
    steps_offset: int = 1
    """Added to every DDIM timestep, as in the original sampler (timesteps 1, 21, ..., 981)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sd-v1"
    """Architecture name, shown to the user."""
    demo: bool = False
    """True for the tiny random-weight demo model: its images are noise, and sdterm says so."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def _build(cls: type, data: Any, where: str) -> Any:
    """Validate a plain mapping into dataclass ``cls`` (unknown keys and wrong types are errors)."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        label = f"{where}.{name}"
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise ConfigError(f"{label}: expected a list of integers, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{label}: expected true or false, got {value!r}")
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{label}: expected an integer, got {value!r}")
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{label}: expected a number, got {value!r}")
            value = float(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{label}: expected text, got {value!r}")
        elif hasattr(default, "__dataclass_fields__"):
            value = _build(type(default), value, label)
        values[name] = value
    return replace(defaults, **values)


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = _build(ModelConfig, data, "config")
    u = cfg.unet
    if u.model_channels % 32 or cfg.vae.ch % 32:
        raise ConfigError("config: model_channels and vae.ch must be multiples of 32 (GroupNorm groups)")
    if u.model_channels % u.num_heads:
        raise ConfigError("config: unet.model_channels must be divisible by unet.num_heads")
    if u.context_dim != cfg.text.hidden_size:
        raise ConfigError("config: unet.context_dim must equal text.hidden_size")
    return cfg


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Read a model YAML file (omegaconf) and validate it into a :class:`ModelConfig`."""
    from omegaconf import OmegaConf  # only here: the engine never needs omegaconf

    path = Path(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except Exception as exc:  # omegaconf/yaml raise many types; all mean "not valid YAML"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not a valid config file ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model_config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def default_config_path() -> Path:
    """configs/sd-v1.yaml, shipped inside the package (and kept at the repo root for reading)."""
    for base in (PACKAGE_CONFIGS, REPO_CONFIGS):
        candidate = base / "sd-v1.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError("configs/sd-v1.yaml is missing from the installation; reinstall sdterm")


def model_config_to_dict(cfg: ModelConfig) -> dict:
    from dataclasses import asdict

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, tuple):
            return list(v)
        return v

    return plain(asdict(cfg))


# --------------------------------------------------------------------------------------------
# Render parameters: one validator for the CLI, the app's commands and config files
# --------------------------------------------------------------------------------------------

MAX_SEED = 2**32 - 1
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_CFG = 50.0


@dataclass(frozen=True)
class RenderRequest:
    prompt: str
    """What to draw. Empty renders unconditionally."""
    negative: str = ""
    """The unconditional text for classifier-free guidance."""
    seed: int = 0
    """0 ... 2^32-1; the starting noise is drawn on the CPU from this seed."""
    steps: int = 50
    """DDIM steps, 1 ... 1000."""
    cfg: float = 7.5
    """Classifier-free guidance scale; 1 disables guidance (one U-Net pass per step)."""
    width: int = 512
    """Image width in pixels, a multiple of 8."""
    height: int = 512
    """Image height in pixels, a multiple of 8."""
    eta: float = 0.0
    """DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise."""
    subseed: int = 0
    """Variation seed (AUTOMATIC1111): a second seed whose noise is mixed into the first."""
    subseed_strength: float = 0.0
    """Variation strength 0..1: spherical interpolation from the seed's noise toward the subseed's."""

    def validated(self) -> "RenderRequest":
        validate_request(self)
        return self


def _check_int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}{hint}")


def _check_float(name: str, value: Any, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value:g}")


def validate_request(req: RenderRequest) -> None:
    """Raise ConfigError with one line naming the first bad parameter and the allowed range."""
    if not isinstance(req.prompt, str) or not isinstance(req.negative, str):
        raise ConfigError("prompt and negative prompt must be text")
    _check_int("seed", req.seed, 0, MAX_SEED)
    _check_int("steps", req.steps, 1, MAX_STEPS)
    _check_float("cfg", req.cfg, 0.0, MAX_CFG)
    _check_float("eta", req.eta, 0.0, 1.0)
    _check_int("variation seed", req.subseed, 0, MAX_SEED)
    _check_float("variation strength", req.subseed_strength, 0.0, 1.0)
    for name, side in (("width", req.width), ("height", req.height)):
        _check_int(name, side, 8, MAX_SIDE)
        if side % 8:
            lower, upper = side - side % 8, side - side % 8 + 8
            raise ConfigError(f"{name} must be a multiple of 8, got {side} (try {lower} or {upper})")


# --------------------------------------------------------------------------------------------
# The user's settings file (sdterm.yaml in the platformdirs config dir)
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str | int, what: str = "size") -> int:
    """'256M', '1.5G', '512MiB', '1000000' -> bytes. K, M and G are binary (1G = 1 GiB), as GPU
    memory is counted by nvidia-smi and torch."""
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?)?B?\s*", str(text), re.IGNORECASE)
        if not m:
            raise ConfigError(f"{what} must be a size such as 256M or 1.5G, got {text!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if value < 0:
        raise ConfigError(f"{what} must not be negative, got {text!r}")
    return value


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
    steps: int = 50
    cfg: float = 7.5
    width: int = 512
    height: int = 512
    budget: str = ""
    """VRAM budget such as 2G; empty: the device's free memory minus a margin."""
    image_protocol: str = "auto"
    """auto, kitty, sixel, halfcell or unicode."""


@dataclass(frozen=True)
class UserConfig:
    cache: CacheSettings = field(default_factory=CacheSettings)
    defaults: Defaults = field(default_factory=Defaults)


def load_user_config(path: Path) -> UserConfig:
    """Read the user's sdterm.yaml; a missing file means defaults."""
    if not path.is_file():
        return UserConfig()
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not a valid settings file ({first})") from None
    try:
        cfg = _build(UserConfig, raw or {}, "sdterm.yaml")
        parse_size(cfg.cache.max_size, "cache.max_size")
        d = cfg.defaults
        # The same validator as the command line and the app's commands.
        validate_request(RenderRequest("", steps=d.steps, cfg=d.cfg, width=d.width, height=d.height))
        if d.budget:
            parse_size(d.budget, "defaults.budget")
        if d.image_protocol not in ("auto", "kitty", "sixel", "halfcell", "unicode"):
            raise ConfigError(f"defaults.image_protocol must be auto, kitty, sixel, halfcell or unicode, got {d.image_protocol!r}")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
