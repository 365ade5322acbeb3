"""A model built straight into its placement units: one flat host buffer per model (pinned when
the device is a GPU), each unit a slice of it, each tensor a view at the place the placement's
layout (:func:`..memory.placement.unit_slots`) gives it.

The model is made on the meta device, its layout computed for the run dtype, the buffer allocated
once, and the weights land in it directly: from the checkpoint (each tensor converted on the way,
``fill_from_checkpoint``) or from the model cache (``packed.py``). ``Placement.register`` then
adopts the units' slices as they are: the weights are never copied a second time.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...config import ModelConfig
from ..memory.placement import ALIGN, Slot, channels_last, set_tensor, slot_view, unit_slots
from ..memory.planner import ModelSizes
from .checkpoint import UNET_PREFIX, VAE_PREFIX, Checkpoint, match_shapes, unreadable

PACKED = ("text", "unet", "vae")
"""The models text-to-image builds from the checkpoint, in the order of their stages."""

READ_THREADS = 4
"""Tensors read and converted at once (positioned reads and copies release the GIL)."""


def meta_model(stage: str, cfg: ModelConfig) -> nn.Module:
    """The stage's model on the meta device (no memory, no initialisation)."""
    if stage == "text":
        from ..networks.clip import text_model

        with torch.device("meta"):
            return text_model(cfg.text)
    from ..networks.unet import UNetModel
    from ..networks.vae import VAEDecoder, VAEEncoder

    build = {"unet": lambda: UNetModel(cfg.unet), "vae": lambda: VAEDecoder(cfg.vae),
             "vae_encoder": lambda: VAEEncoder(cfg.vae)}[stage]
    with torch.device("meta"):
        return build()


def model_sizes(cfg: ModelConfig, dtype: torch.dtype) -> ModelSizes:
    """Bytes of each model and U-Net unit in ``dtype``, each tensor aligned as the units lay it
    out (from meta-device modules)."""
    import math

    from ..networks.clip import text_encoder_shapes

    itemsize = torch.tensor([], dtype=dtype).element_size()

    def aligned(numel: int) -> int:
        return -(-numel * itemsize // ALIGN) * ALIGN

    def nbytes(m: nn.Module) -> int:
        return sum(aligned(t.numel()) for t in m.parameters())

    unet, vae, encoder = (meta_model(stage, cfg) for stage in ("unet", "vae", "vae_encoder"))
    text = sum(aligned(math.prod(shape)) for shape in text_encoder_shapes(cfg.text).values())
    units = tuple((name, nbytes(m), level) for name, m, level in unet.units())
    return ModelSizes(text, sum(b for _, b, _ in units), nbytes(vae), units, nbytes(encoder))


def stage_units(stage: str, model: nn.Module) -> list[nn.Module]:
    """The modules that move to the device separately: the U-Net's layers, else the whole model."""
    if stage == "unet":
        return [m for _, m, _ in model.units()]
    return [model]


def load_root(stage: str, model: nn.Module) -> nn.Module:
    """The module whose state-dict names follow the checkpoint prefix (CLIP's nested text_model)."""
    if stage == "text":
        from ..networks.clip import clip_inner

        return clip_inner(model)
    return model


def checkpoint_prefix(stage: str, keys: list[str]) -> str:
    if stage == "text":
        from ..networks.clip import clip_prefix

        return clip_prefix(keys)
    return UNET_PREFIX if stage == "unet" else VAE_PREFIX


@dataclass
class StageLayout:
    """Where each unit of a model sits in the model's buffer, and each tensor in its unit."""

    stage: str
    model: nn.Module
    units: list[tuple[list[Slot], int]]
    """Per unit: its slots and its size in bytes (a multiple of ALIGN)."""
    starts: list[int]
    total: int

    def names(self) -> list[list[str]]:
        """Per unit, each slot's dotted name under the load root (its state-dict name)."""
        owners = {id(m): name for name, m in load_root(self.stage, self.model).named_modules()}
        return [[f"{owners[id(s.owner)]}.{s.name}".lstrip(".") for s in slots] for slots, _ in self.units]

    def describe(self) -> list[dict]:
        """The layout as plain data (the model cache's header stores it and compares it on read)."""
        names = self.names()
        return [{"nbytes": nbytes, "slots": [[n, str(s.dtype).removeprefix("torch."), list(s.shape), s.offset,
                                              "nhwc" if s.channels_last else "nchw"]
                                             for n, s in zip(unit_names, slots)]}
                for (slots, nbytes), unit_names in zip(self.units, names)]

    def unit_hosts(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        return [buffer[start : start + nbytes] for start, (_, nbytes) in zip(self.starts, self.units)]

    def bind(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Point every tensor of the model at its place in ``buffer``; the units' slices."""
        hosts = self.unit_hosts(buffer)
        self._bind_units(hosts)
        return hosts

    def bind_shared(self, buffer: torch.Tensor) -> None:
        """Point every unit's tensors into the same ``buffer`` (at least the largest unit's bytes),
        each where it sits in its unit: a stand-in's weights (model_warm.py), whose values are
        never used."""
        self._bind_units([buffer] * len(self.units))

    def _bind_units(self, hosts: list[torch.Tensor]) -> None:
        for host, (slots, _) in zip(hosts, self.units):
            for slot in slots:
                set_tensor(slot, slot_view(host, 0, slot))


def stage_layout(stage: str, model: nn.Module, dtype: torch.dtype) -> StageLayout:
    """The layout of ``model`` (on the meta device) with its floating tensors in ``dtype``."""
    if stage == "text":
        # position_ids is rebuilt, not loaded (some files carry it, some transformers persist it);
        # as a plain (1, positions) buffer it is packed with the weights.
        emb = load_root(stage, model).embeddings
        n = emb.position_embedding.weight.shape[0]
        emb.register_buffer("position_ids", torch.empty((1, n), dtype=torch.int64, device="meta"), persistent=False)
    last = channels_last(stage, dtype)
    units = [unit_slots([m], dtype, last=last) for m in stage_units(stage, model)]
    starts, at = [], 0
    for _, nbytes in units:
        starts.append(at)
        at += nbytes
    return StageLayout(stage, model, units, starts, max(at, 1))


def fill_from_checkpoint(stage: str, layout: StageLayout, buffer: torch.Tensor, ckpt: Checkpoint,
                         on_unit: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """Read every tensor of the model from ``ckpt`` into its place in ``buffer`` (converted to the
    layout's dtype on the way), unit after unit, ``on_unit(i, host)`` once unit ``i`` is complete in
    ``host``; then
    bind the model to the buffer. Names and shapes were verified when the file was opened."""
    prefix = checkpoint_prefix(stage, ckpt.keys())
    hosts = layout.unit_hosts(buffer)
    names = layout.names()
    rebuilt = stage == "text"  # position_ids: not loaded but rebuilt (some files lack it)
    # Every tensor present with its shape, or one line naming what is missing (a pruned encoder).
    match_shapes({n: tuple(s.shape) for unit_names, (slots, _) in zip(names, layout.units)
                  for n, s in zip(unit_names, slots) if not (rebuilt and n.endswith("position_ids"))}, ckpt, prefix)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="sdterm-read") as pool:
        for i, (host, (slots, _), unit_names) in enumerate(zip(hosts, layout.units, names)):
            jobs = []
            for name, slot in zip(unit_names, slots):
                view = slot_view(host, 0, slot)
                if rebuilt and name.endswith("position_ids"):
                    view.copy_(torch.arange(view.shape[-1]).expand_as(view))
                    continue
                jobs.append(pool.submit(ckpt.read_into, prefix + name, view))
            for job in jobs:
                try:
                    job.result()
                except (OSError, ValueError) as exc:
                    raise unreadable(ckpt.path, exc) from None
            if on_unit is not None:
                on_unit(i, host)
    layout.bind(buffer)
    layout.model.eval().requires_grad_(False)
    return hosts
