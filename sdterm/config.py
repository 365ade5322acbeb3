"""The model's architecture: typed dataclasses for the U-Net, the VAE, the text encoder and the noise
schedule, read from a model YAML file (``configs/sd-v1.yaml``, or one beside a checkpoint).

Every field is documented where it is declared. YAML is read through omegaconf, imported lazily
so the engine (which uses these dataclasses) stays importable without it; :func:`read_yaml` and
:func:`from_mapping` are also what ``sdterm/settings.py`` reads the user's settings with. Render
parameters live in ``sdterm/params.py``, the user's settings in ``sdterm/settings.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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


def from_mapping(cls: type, data: Any, where: str) -> Any:
    """Validate a plain mapping (read from YAML) into dataclass ``cls``, whose fields all have
    defaults; unknown keys and wrong types are ConfigErrors naming ``where.key``."""
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
            value = from_mapping(type(default), value, label)
        values[name] = value
    return replace(defaults, **values)


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = from_mapping(ModelConfig, data, "config")
    u = cfg.unet
    if u.model_channels % 32 or cfg.vae.ch % 32:
        raise ConfigError("config: model_channels and vae.ch must be multiples of 32 (GroupNorm groups)")
    if u.model_channels % u.num_heads:
        raise ConfigError("config: unet.model_channels must be divisible by unet.num_heads")
    if u.context_dim != cfg.text.hidden_size:
        raise ConfigError("config: unet.context_dim must equal text.hidden_size")
    return cfg


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The plain data (dicts, lists, scalars) of the YAML file at ``path``, through omegaconf;
    ConfigError naming the file when it is missing or not valid YAML."""
    from omegaconf import OmegaConf  # only here: the engine never needs omegaconf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except Exception as exc:  # omegaconf/yaml raise many types; all mean "not valid YAML"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not a valid {what} ({first})") from None


def load_model_config(path: str | os.PathLike) -> ModelConfig:
    """Read a model YAML file (omegaconf) and validate it into a :class:`ModelConfig`."""
    path = Path(path)
    raw = read_yaml(path)
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
