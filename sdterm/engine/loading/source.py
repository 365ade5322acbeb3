"""What ``--model`` names: a checkpoint file (or a model folder) and the architecture it has."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import ModelConfig, default_config_path, load_model_config
from ..prompt.tokenizer import find_tokenizer
from .checkpoint import resolve_model_path


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a checkpoint file (or demo folder) and its architecture."""

    checkpoint: Path | None
    """None for random weights (measurements without a checkpoint)."""
    config: ModelConfig
    name: str
    """What A1111 shows as ``Model:`` (the file name without extension, or the folder name)."""
    tokenizer_dir: Path | None

    @property
    def demo(self) -> bool:
        return self.config.demo or self.checkpoint is None


def open_model(path: str | Path, *, config_path: str | Path | None = None, data_dir: Path | None = None) -> ModelSource:
    """Resolve ``--model``: a checkpoint file, or a folder with model.safetensors + config.yaml.

    The architecture comes from ``config_path``, else a ``config.yaml`` in the folder, else a
    ``<name>.yaml`` beside the file, else configs/sd-v1.yaml.
    """
    ckpt = resolve_model_path(path)
    given = Path(path).expanduser()
    folder = given if given.is_dir() else None
    if config_path is None:
        for cand in ([folder / "config.yaml"] if folder else []) + [ckpt.with_suffix(".yaml")]:
            if cand.is_file():
                config_path = cand
                break
    cfg = load_model_config(config_path or default_config_path())
    name = folder.name if folder else ckpt.stem
    return ModelSource(ckpt, cfg, name, find_tokenizer(ckpt, data_dir))


__all__ = ["ModelSource", "open_model"]
