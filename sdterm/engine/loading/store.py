"""Where a checkpoint's models come from on the host: the model cache (``packed.py``) when it
holds them, else the checkpoint itself, converted straight into the placement's units (and packed
meanwhile, for the next start)."""

from __future__ import annotations

import atexit
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import Checkpoint
from ..memory.host_memory import aligned, lock
from .host_units import PACKED, StageLayout, fill_from_checkpoint, meta_model, stage_layout
from .packed import Pack, PackError, PackWriter, pack_key


class HostStore:
    """Builds a stage's model into one host buffer (pinned when ``pin``) cut into its units.

    ``folder``: the model cache's folder (None: no cache). ``checkpoint()`` opens the file and
    ``verify()`` checks it (both only when a model has to come from it); ``digest()`` is the
    file's sha256 (waited for by the thread that publishes a pack, never on the caller's)."""

    def __init__(self, path: Path, cfg, dtype: torch.dtype, *, pin: bool, folder: Path | None,
                 checkpoint: Callable[[], Checkpoint], verify: Callable[[], None], digest: Callable[[], str]):
        self.path, self.cfg, self.dtype, self.pin, self.folder = path, cfg, dtype, pin, folder
        self._checkpoint, self._verify, self._digest = checkpoint, verify, digest
        self.hosts: dict[str, list[torch.Tensor]] = {}
        """Per model built here, its units' host buffers (``Placement.register`` adopts them)."""
        self.verified = False
        self.pack: Pack | None = None
        self.writer: PackWriter | None = None
        self._layouts: dict[str, StageLayout] = {}
        self._built: set[str] = set()
        self._key: dict | None = None
        if folder is not None:
            try:
                self._key = pack_key(path, cfg, dtype)
            except OSError:
                self.folder = None
            else:
                self.pack = Pack.open(folder, self._key)

    @property
    def sha256(self) -> str | None:
        """The checkpoint's sha256 as the pack recorded it (None without a pack)."""
        return self.pack.sha256 if self.pack is not None else None

    def ensure_verified(self) -> None:
        if not self.verified:
            self._verify()
            self.verified = True

    def _layout(self, stage: str) -> StageLayout:
        if stage not in self._layouts:
            self._layouts[stage] = stage_layout(stage, meta_model(stage, self.cfg), self.dtype)
        return self._layouts[stage]

    def build(self, stage: str, packable: tuple[str, ...] = PACKED) -> nn.Module:
        """The model ``stage`` on the host: from the pack if it holds it (verified while read),
        else from the checkpoint. ``packable``: the models this process takes from the checkpoint
        (a pack is written for those)."""
        layout = self._layout(stage)
        # Filled first, page-locked after (CUDA's start-up, on a thread, overlaps the reading).
        buffer = aligned(layout.total) if self.pin else torch.empty(layout.total, dtype=torch.uint8)
        if self.pack is not None and self.pack.fd >= 0 and self.pack.has(stage):
            try:
                self.pack.read_stage(stage, layout, buffer)
            except PackError:
                self.pack.discard()  # never trusted again; rebuilt from the checkpoint below
                self.pack = None
            else:
                return self._done(stage, layout, layout.bind(buffer), buffer)
        self.ensure_verified()
        writer = self._writer_for(stage, packable)
        on_unit = (lambda i, host: writer.unit_done(stage, i, host)) if writer is not None else None
        try:
            hosts = fill_from_checkpoint(stage, layout, buffer, self._checkpoint(), on_unit)
        except BaseException:
            self._layouts.pop(stage, None)  # half bound: a retry starts from a fresh model
            if writer is not None:
                writer.abandon()
            raise
        if writer is not None:
            writer.stage_done(stage)  # before anyone may change the weights (a LoRA merge)
            if writer.complete():
                writer.finish()
        return self._done(stage, layout, hosts, buffer)

    def _done(self, stage: str, layout: StageLayout, hosts: list[torch.Tensor], buffer: torch.Tensor) -> nn.Module:
        if self.pin:
            lock(buffer)  # where CUDA refuses, plain memory: uploads from it are synchronous
        self._layouts.pop(stage, None)
        self._built.add(stage)
        self.hosts[stage] = hosts
        if self.pack is not None and all(s in self._built for s in self.pack.header.get("models", {})):
            self.pack.close()  # all read (its header stays: the sha256)
        return layout.model.eval().requires_grad_(False)

    def _writer_for(self, stage: str, packable: tuple[str, ...]) -> PackWriter | None:
        """The pack being written, started with the first model that comes from the checkpoint
        when none is built yet (a model read earlier may hold a LoRA merge by now: no pack then)."""
        if self.writer is not None:
            usable = not (self.writer.failed or self.writer.finished) and stage in self.writer.entries
            return self.writer if usable else None
        if self.folder is None or self._key is None or self._built or stage not in packable:
            return None
        try:
            layouts = {s: self._layout(s) for s in PACKED if s in packable}
        except Exception:  # noqa: BLE001 - a model that can't even be laid out is just not packed
            return None
        key, path, cfg, dtype = self._key, self.path, self.cfg, self.dtype

        def still() -> dict:
            return pack_key(path, cfg, dtype)

        self.writer = PackWriter(self.folder, key, layouts, sha256=self._digest, still=still)
        atexit.register(_publish_partial, weakref.ref(self.writer))
        return self.writer

    def forget(self, stage: str) -> None:
        self.hosts.pop(stage, None)
        self._built.discard(stage)


def _publish_partial(ref: weakref.ref) -> None:
    """At exit: publish a pack that holds the U-Net but not every model (the text encoder is not
    built when the prompt cache has every chunk); the next start reads the rest from the file."""
    writer = ref()
    if writer is not None and not writer.finished and not writer.failed and "unet" in writer.done:
        thread = writer.finish()
        if thread is not None:
            thread.join()
