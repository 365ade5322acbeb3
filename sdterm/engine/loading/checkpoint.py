"""Reading Stable Diffusion checkpoints safely: safetensors (memory-mapped) and .ckpt pickles
restricted to tensors and plain containers, the original key layout, and the model hash.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
MODEL_FILENAMES = ("model.safetensors", "model.ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(Exception):
    """The file can't be used; ``str(exc)`` is one line naming the file and the reason."""


def unreadable(path, exc: BaseException) -> CheckpointError:
    """The one line for weights that could not be read from ``path`` (a read error, or a file
    shorter than its header says)."""
    return CheckpointError(f"{path}: cannot read the weights ({exc}); is it truncated?")


@dataclass
class Checkpoint:
    """A state dict whose tensors are read on demand (safetensors) or memory-mapped (zip .ckpt)."""

    path: Path
    _tensors: dict | None = None  # .ckpt: name -> tensor (mmap-backed where possible)
    _safe: object | None = None  # .safetensors: a safe_open handle (names and shapes)
    _file: object | None = None  # .safetensors: a TensorFile (the weights, by positioned reads)

    def keys(self) -> list[str]:
        if self._safe is not None:
            return list(self._safe.keys())
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._safe is not None:
            return tuple(self._safe.get_slice(key).get_shape())
        return tuple(self._tensors[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        if self._file is not None:
            entry = self._file.entries[key]
            out = torch.empty(entry.shape, dtype=entry.dtype)
            self._file.read_into(key, out)
            return out
        return self._tensors[key]

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read the tensor ``key`` into ``out`` (same shape; converted to its dtype): from a
        safetensors file by positioned reads (no memory map), from a .ckpt by a copy."""
        if self._file is not None:
            self._file.read_into(key, out)
        else:
            out.copy_(self._tensors[key])

    def tensor_file(self):
        """The safetensors file's :class:`TensorFile` (its tensors' offsets); None for a .ckpt."""
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._safe = None
        self._file = None
        self._tensors = None


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a folder holding ``model.safetensors``/``model.ckpt`` (demo-model's layout)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder (give --model a .safetensors/.ckpt file or a model folder)")
    if p.is_dir():
        for name in MODEL_FILENAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(q.name for q in p.iterdir() if q.suffix in CHECKPOINT_SUFFIXES)
        if (p / "unet").is_dir() or (p / "model_index.json").exists():
            raise CheckpointError(
                f"{p}: this is a diffusers-format folder; sdterm needs the original single-file checkpoint "
                "(e.g. v1-5-pruned-emaonly.safetensors)"
            )
        hint = f" (it holds {', '.join(found[:3])}: pass that file)" if found else ""
        raise CheckpointError(f"{p}: folder has no model.safetensors or model.ckpt{hint}")
    return p


def sniff_format(path: Path) -> str:
    """'safetensors', 'zip' (torch >= 1.6 .ckpt), 'pickle' (legacy torch.save) or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker
        return "pickle"
    return "unknown"


def unsafe_pickle_reason(exc: Exception) -> str | None:
    """What a weights_only unpickler refused, if that is why loading failed."""
    text = str(exc)
    m = (
        re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        or re.search(r"unsupported GLOBAL ([\w.]+)", text)
        or re.search(r"Trying to call reduce for ([\w.]+)", text)
    )
    if m:
        return f"it would run {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"it uses pickle opcode {m.group(1)}, which is not allowed"
    if "Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError):
        first = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
        return first or "it contains objects other than tensors and plain containers"
    return None


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint for reading; never executes code from the file."""
    p = resolve_model_path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror})") from None
    if size == 0:
        raise CheckpointError(f"{p}: the file is empty")
    try:
        kind = sniff_format(p)
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot read ({exc.strerror})") from None

    if kind == "safetensors":
        from safetensors import safe_open

        from .tensor_reader import TensorFile

        try:
            handle = safe_open(str(p), framework="pt", device="cpu")
            handle.keys()
            reader = TensorFile(p)
        except Exception as exc:
            raise CheckpointError(f"{p}: not a readable safetensors file ({first_line(exc)}); is it truncated?") from None
        return Checkpoint(p, _safe=handle, _file=reader)

    if kind in ("zip", "pickle"):
        if kind == "zip":
            try:
                with zipfile.ZipFile(p) as z:
                    z.namelist()
            except (zipfile.BadZipFile, OSError):
                raise CheckpointError(f"{p}: the .ckpt archive is damaged or truncated") from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=kind == "zip")
        except Exception as exc:
            reason = unsafe_pickle_reason(exc)
            if reason:
                raise CheckpointError(
                    f"{p}: refused to load: {reason}; only tensors and plain containers are accepted "
                    "(use a .safetensors version of this model)"
                ) from None
            raise CheckpointError(f"{p}: not a readable checkpoint ({first_line(exc)}); is it truncated?") from None
        return Checkpoint(p, _tensors=_flatten_state_dict(obj, p))

    raise CheckpointError(f"{p}: not a checkpoint (neither safetensors nor a PyTorch .ckpt)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _flatten_state_dict(obj: object, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{p}: holds no tensors")
    return tensors


# --------------------------------------------------------------------------------------------
# What is this file?
# --------------------------------------------------------------------------------------------


def identify(ckpt: Checkpoint) -> str | None:
    """Name what a checkpoint is when it is recognisably *not* an SD v1 text-to-image model."""
    keys = ckpt.keys()
    keyset = set(keys)

    def has_prefix(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has_prefix("conditioner.embedders."):
        return "an SDXL checkpoint"
    if has_prefix("cond_stage_model.model.") or has_prefix("cond_stage_model.model.transformer"):
        return "a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder)"
    first = UNET_PREFIX + "input_blocks.0.0.weight"
    if first in keyset:
        in_ch = ckpt.shape(first)[1]
        if in_ch == 9:
            return "an inpainting checkpoint (9 input channels)"
        if in_ch == 8:
            return "an instruct-pix2pix checkpoint (8 input channels)"
    if has_prefix("lora_") or any(".lora_" in k or "lora_down" in k for k in keys[:200]):
        return "a LoRA, not a full model"
    if not has_prefix(UNET_PREFIX):
        if has_prefix("down_blocks.") or has_prefix("unet.") or has_prefix("transformer_blocks."):
            return "a diffusers-format file, not the original single-file layout"
        if has_prefix("encoder.conv_in") or has_prefix("decoder.conv_in"):
            return "a standalone VAE, not a full model"
        return "not a Stable Diffusion checkpoint"
    proj = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
    if proj in keyset and len(ckpt.shape(proj)) == 2:
        return "a Stable Diffusion 2.x checkpoint (linear transformer projections)"
    return None


# --------------------------------------------------------------------------------------------
# Loading into modules
# --------------------------------------------------------------------------------------------


def _match(module: nn.Module, ckpt: Checkpoint, prefix: str, ignore: tuple[str, ...]) -> dict[str, str]:
    """Map each parameter/persistent buffer of ``module`` to its checkpoint key, or raise one line
    saying what is missing or mis-shaped (and what the file is, where recognisable)."""
    shapes = {name: tuple(ref.shape) for name, ref in module.state_dict(keep_vars=True).items()}
    return match_shapes(shapes, ckpt, prefix, ignore)


def match_shapes(shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint, prefix: str,
                 ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """:func:`_match` for a module known by its tensors' names and shapes (no module built)."""
    keyset = set(ckpt.keys())
    found: dict[str, str] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for name, shape in shapes.items():
        if name.endswith(ignore):
            continue
        key = prefix + name
        if key not in keyset:
            missing.append(key)
        elif tuple(ckpt.shape(key)) != tuple(shape):
            wrong.append(f"{key} is {list(ckpt.shape(key))}, expected {list(shape)}")
        else:
            found[name] = key
    if missing or wrong:
        what = identify(ckpt)
        detail = f"missing {len(missing)} tensor(s), e.g. {missing[0]}" if missing else wrong[0]
        if what:
            raise CheckpointError(f"{ckpt.path}: this is {what}; sdterm runs Stable Diffusion v1 ({detail})")
        raise CheckpointError(f"{ckpt.path}: does not match the SD v1 architecture: {detail}")
    return found


def verify_module(module: nn.Module, ckpt: Checkpoint, prefix: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Check (without reading any weights) that ``ckpt`` can fill ``module``; raises CheckpointError."""
    _match(module, ckpt, prefix, ignore)


def load_module(
    module: nn.Module,
    ckpt: Checkpoint,
    prefix: str,
    dtype: torch.dtype,
    *,
    ignore: tuple[str, ...] = (),
) -> nn.Module:
    """Fill ``module`` (built on the meta device) from ``ckpt[prefix + name]``, converting to ``dtype``.

    Every parameter and persistent buffer must be present with the right shape; extra keys in the
    checkpoint (EMA, encoder, optimizer) are ignored. Tensors are converted one at a time, so the
    source and the converted model never both sit in memory in full.
    """
    loaded: dict[str, torch.Tensor] = {}
    for name, key in _match(module, ckpt, prefix, ignore).items():
        t = ckpt.tensor(key)
        target = dtype if t.is_floating_point() else t.dtype
        loaded[name] = t.to(target, copy=True).contiguous()
        del t
    module.load_state_dict(loaded, strict=False, assign=True)
    still_meta = [n for n, t in module.state_dict().items() if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{ckpt.path}: could not fill {still_meta[0]}")
    return module.eval().requires_grad_(False)

