"""Standalone VAE files (A1111's ``--vae``/``models/VAE``): decode with another VAE than the checkpoint's.

A VAE file holds the LDM AutoencoderKL names (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``), optionally under the ``first_stage_model.`` prefix a full checkpoint uses
and optionally wrapped in ``state_dict`` (a .ckpt); training leftovers (``loss.*``, ``model_ema.*``)
are ignored. It is opened by the checkpoints' own safe reader (a pickle that would run code is
refused and never runs) and verified by name and shape against sdterm's decoder before any tensor
is read. Only ``post_quant_conv.*`` and ``decoder.*`` must be there; a file that also has
``encoder.*`` encodes images too (A1111 loads the whole VAE), checked by name and shape when
the encoder is first built.

Identity as A1111 writes it in the infotext: ``VAE: <file name with extension>``, ``VAE hash``:
the first 10 hex digits of the whole file's sha256 (remembered per path, size and mtime).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import VAEConfig
from torch import nn

from ..networks.vae import VAEDecoder, VAEEncoder
from .file_hash import remembered_sha256, short_hash
from .checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    Checkpoint,
    CheckpointError,
    identify,
    load_module,
    open_checkpoint,
)

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class VAEFile:
    """A verified VAE file and the prefix its tensors sit under ("" or ``first_stage_model.``)."""

    path: Path
    prefix: str
    has_encoder: bool = False
    """The file has ``encoder.*`` tensors: encoding uses them instead of the checkpoint's."""

    @property
    def name(self) -> str:
        """What A1111 writes as ``VAE:``: the file name with its extension."""
        return self.path.name

    def sha256(self, memo: Path | None) -> str:
        return remembered_sha256(self.path, memo)

    def short_hash(self, memo: Path | None) -> str:
        """A1111's ``VAE hash``: the first 10 hex digits of the whole file's sha256."""
        return short_hash(self.sha256(memo))

    def load(self, cfg: VAEConfig, dtype: torch.dtype) -> VAEDecoder:
        """The decoder filled from this file, converted to ``dtype`` (the run dtype) while loading."""
        ckpt = open_vae_checkpoint(self.path)
        try:
            with torch.device("meta"):
                vae = VAEDecoder(cfg)
            return load_module(vae, ckpt, self.prefix, dtype)
        finally:
            ckpt.close()

    def load_encoder(self, cfg: VAEConfig, dtype: torch.dtype) -> VAEEncoder:
        """The encoder (``encoder.*``, ``quant_conv.*``) filled from this file; CheckpointError,
        one line, when those tensors are incomplete or mis-shaped."""
        ckpt = open_vae_checkpoint(self.path)
        try:
            with torch.device("meta"):
                encoder = VAEEncoder(cfg)
            _check(encoder, ckpt, self.prefix, "a usable SD v1 VAE encoder")
            return load_module(encoder, ckpt, self.prefix, dtype)
        finally:
            ckpt.close()


def _check(module: nn.Module, ckpt: Checkpoint, prefix: str, what: str) -> None:
    """Every tensor of ``module`` is in the file under ``prefix`` with its shape, or one line
    naming the file and the first missing or mis-shaped tensor."""
    keyset = set(ckpt.keys())
    missing, wrong = [], []
    for name, ref in module.state_dict(keep_vars=True).items():
        key = prefix + name
        if key not in keyset:
            missing.append(key)
        elif tuple(ckpt.shape(key)) != tuple(ref.shape):
            wrong.append(f"{key} is {list(ckpt.shape(key))}, expected {list(ref.shape)}")
    if missing or wrong:
        detail = wrong[0] if wrong else f"missing {len(missing)} tensor(s), e.g. {missing[0]}"
        raise CheckpointError(f"{ckpt.path}: not {what}: {detail}")


def open_vae_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The file opened by the checkpoints' safe reader; CheckpointError naming it otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder; --vae takes a VAE file (.safetensors, .ckpt or .pt)")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such VAE file")
    return open_checkpoint(p)


def _prefix(keys: list[str]) -> str:
    return VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""


def what_vae(ckpt: Checkpoint, prefix: str) -> str | None:
    """Name what a file is when it is recognisably not an SD v1 VAE in the LDM layout."""
    keys = ckpt.keys()

    def has(start: str) -> bool:
        return any(k.startswith(prefix + start) for k in keys)

    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint"
    if has("decoder.up_blocks.") or has("encoder.down_blocks.") or has("decoder.mid_block."):
        return ("a diffusers-format VAE (decoder.up_blocks.*); sdterm reads the original LDM layout "
                "(decoder.up.*), as in vae-ft-mse-840000-ema-pruned.safetensors")
    if has("decoder.layers.") or has("encoder.layers."):
        return "a tiny autoencoder (TAESD), not an AutoencoderKL VAE"
    conv_in = prefix + "decoder.conv_in.weight"
    if conv_in in set(keys) and len(ckpt.shape(conv_in)) == 4 and ckpt.shape(conv_in)[1] != 4:
        return f"a VAE with {ckpt.shape(conv_in)[1]} latent channels (SD3/Flux-style); SD v1 decodes 4"
    if not has("decoder.") and not has("post_quant_conv."):
        if any(k.startswith((UNET_PREFIX, "lora_")) or ".lora_" in k for k in keys):
            return identify(ckpt) or "a model checkpoint without a VAE"
        return "not a VAE (no decoder.* or post_quant_conv.* tensors)"
    return None


def verify_vae_file(path: str | os.PathLike, cfg: VAEConfig) -> VAEFile:
    """Open ``path`` and check (without reading any weights) that it fills sdterm's decoder.

    CheckpointError with one line naming the file and what it is when it isn't a usable SD v1 VAE."""
    ckpt = open_vae_checkpoint(path)
    try:
        keys = ckpt.keys()
        prefix = _prefix(keys)
        what = what_vae(ckpt, prefix)
        if what:
            raise CheckpointError(f"{ckpt.path}: this is {what}, not a Stable Diffusion v1 VAE")
        with torch.device("meta"):
            vae = VAEDecoder(cfg)
        _check(vae, ckpt, prefix, "a usable SD v1 VAE")
        return VAEFile(ckpt.path, prefix, any(k.startswith(prefix + "encoder.") for k in keys))
    finally:
        ckpt.close()
