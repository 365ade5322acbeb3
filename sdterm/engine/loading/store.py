"""Where a checkpoint's models come from on the host: the model cache (``packed.py``) when it
holds them, else the checkpoint itself, converted straight into the placement's units (and packed
meanwhile, for the next start): model by model when a stage asks, or, on a large file's first use,
the U-Net and the VAE decoder in one pass over the file on threads (``single_pass.py``) that
``build`` waits for."""

from __future__ import annotations

import atexit
import threading
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import Checkpoint, unreadable
from ..memory.host_memory import aligned, lock
from ..memory.placement import slot_view
from .host_units import PACKED, StageLayout, checkpoint_prefix, fill_from_checkpoint, meta_model, stage_layout
from .packed import Pack, PackError, PackWriter, pack_key
from .single_pass import SinglePass


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
        self._lock = threading.RLock()
        """Held while the bookkeeping changes: a first pass builds models on threads of its own."""
        self.first_pass: SinglePass | None = None
        self._pass_stages: set[str] = set()
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
        with self._lock:
            known = self._layouts.get(stage)
        if known is not None:
            return known
        # Made outside the lock (a model's Python construction), while a first pass's thread may
        # wait for the lock to hand over the U-Net.
        made = stage_layout(stage, meta_model(stage, self.cfg), self.dtype)
        with self._lock:
            return self._layouts.setdefault(stage, made)

    def build(self, stage: str, packable: tuple[str, ...] = PACKED) -> nn.Module:
        """The model ``stage`` on the host: from the pack if it holds it (verified while read),
        else from the checkpoint. ``packable``: the models this process takes from the checkpoint
        (a pack is written for those)."""
        if stage in self._pass_stages:  # being built by the first pass: waited for
            self._pass_stages.discard(stage)  # (after a failure, a retry reads the file as below)
            try:
                return self.first_pass.model(stage)
            except (OSError, ValueError) as exc:
                raise unreadable(self.path, exc) from None
        layout = self._layout(stage)
        buffer = self._buffer(layout)
        if self.from_pack(stage):
            try:
                self.pack.read_stage(stage, layout, buffer)
            except PackError:
                self.pack.discard()  # never trusted again; rebuilt from the checkpoint below
                self.pack = None
            else:
                return self._done(stage, layout, layout.bind(buffer), buffer)
        self.ensure_verified()
        with self._lock:
            writer = self._writer_for(stage, packable)
            if writer is not None:
                writer.add(stage, layout)
        on_unit = (lambda i, host: writer.unit_done(stage, i, host)) if writer is not None else None
        try:
            hosts = fill_from_checkpoint(stage, layout, buffer, self._checkpoint(), on_unit)
        except BaseException:
            with self._lock:
                self._layouts.pop(stage, None)  # half bound: a retry starts from a fresh model
            if writer is not None:
                writer.abandon()
            raise
        self._written(writer, stage)
        return self._done(stage, layout, hosts, buffer)

    def from_pack(self, stage: str) -> bool:
        """Whether ``build(stage)`` will read the model from the pack (a fraction of a second)."""
        return (stage not in self._pass_stages and self.pack is not None and self.pack.fd >= 0
                and self.pack.has(stage))

    def _buffer(self, layout: StageLayout) -> torch.Tensor:
        # Filled first, page-locked after (CUDA's start-up, on a thread, overlaps the reading).
        return aligned(layout.total) if self.pin else torch.empty(layout.total, dtype=torch.uint8)

    @staticmethod
    def _written(writer: PackWriter | None, stage: str) -> None:
        """Every unit of ``stage`` is queued: the model goes to its user now, its units' writes
        finish on a thread (they only read its buffers; ``settle_writes`` waits for them)."""
        if writer is not None:
            writer.close_stage(stage)

    def settle_writes(self, stage: str) -> None:
        """Wait until the pack holds ``stage``'s units (before its weights change in place)."""
        if self.writer is not None:
            self.writer.settle(stage)

    def start_pass(self, stages: tuple[str, ...], packable: tuple[str, ...], *, sha256: bool,
                   memo: Path | None) -> SinglePass | None:
        """Build ``stages`` from the checkpoint (a safetensors file; None for another) in one pass
        over the file on threads of its own, packed meanwhile and hashed when ``sha256`` (the pass
        is then the hash: ``result()``); ``build`` waits for them. Verifies the file first."""
        self.ensure_verified()
        ckpt = self._checkpoint()
        tensors = ckpt.tensor_file()
        if tensors is None or not stages:
            return None
        with self._lock:
            layouts = {s: self._layout(s) for s in stages}
            writer = self._writer_for(stages[0], packable)
        buffers = {s: self._buffer(layouts[s]) for s in stages}
        targets: dict[str, tuple[str, int, torch.Tensor]] = {}
        units: dict[tuple[str, int], torch.Tensor] = {}
        keys = ckpt.keys()
        for s in stages:
            prefix, layout = checkpoint_prefix(s, keys), layouts[s]
            for i, (host, (slots, _), names) in enumerate(zip(layout.unit_hosts(buffers[s]), layout.units, layout.names())):
                units[(s, i)] = host
                for name, slot in zip(names, slots):
                    targets[prefix + name] = (s, i, slot_view(host, 0, slot))

        def on_stage(stage: str) -> nn.Module:
            self._written(writer, stage)
            layout, buffer = layouts[stage], buffers[stage]
            return self._done(stage, layout, layout.bind(buffer), buffer)

        def on_error(exc: BaseException) -> None:
            with self._lock:
                for s in stages:
                    self._layouts.pop(s, None)
            if writer is not None:
                writer.abandon()

        self._pass_stages = set(stages)
        self.first_pass = SinglePass(self.path, tensors.entries, targets, units, sha256=sha256, memo=memo,
                                     on_unit=writer.unit_done if writer is not None else None,
                                     on_stage=on_stage, on_error=on_error)
        return self.first_pass

    def settle(self) -> None:
        """Wait for the first pass's models (none is being built on a thread after this)."""
        if self.first_pass is not None:
            self.first_pass.wait()

    def _done(self, stage: str, layout: StageLayout, hosts: list[torch.Tensor], buffer: torch.Tensor) -> nn.Module:
        with self._lock:
            return self._adopt(stage, layout, hosts, buffer)

    def _adopt(self, stage: str, layout: StageLayout, hosts: list[torch.Tensor], buffer: torch.Tensor) -> nn.Module:
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
            usable = not (self.writer.failed or self.writer.finished) and stage in self.writer.expected
            return self.writer if usable else None
        if self.folder is None or self._key is None or self._built or stage not in packable:
            return None
        try:  # the text encoder is added when it is built, unless laid out now (a render whose
            # prompts are all cached never builds it: the pack is then published without it)
            layouts = {s: self._layout(s) for s in PACKED if s in packable and (s != "text" or s in self._layouts)}
        except Exception:  # noqa: BLE001 - a model that can't even be laid out is just not packed
            return None
        later = tuple(s for s in PACKED if s in packable and s not in layouts)
        key, path, cfg, dtype = self._key, self.path, self.cfg, self.dtype

        def still() -> dict:
            return pack_key(path, cfg, dtype)

        self.writer = PackWriter(self.folder, key, layouts, sha256=self._digest, still=still, later=later)
        atexit.register(_publish_partial, weakref.ref(self.writer))
        return self.writer

    def forget(self, stage: str) -> None:
        """No reference to the model ``stage`` is kept here any more; a next ``build`` makes it
        again (from the pack or the checkpoint, not from a first pass)."""
        self._pass_stages.discard(stage)
        self.hosts.pop(stage, None)
        self._built.discard(stage)
        if self.first_pass is not None:
            self.first_pass.release(stage)


def _publish_partial(ref: weakref.ref) -> None:
    """At exit: publish a pack that holds the U-Net but not every model (the text encoder is not
    built when the prompt cache has every chunk); the next start reads the rest from the file."""
    writer = ref()
    if writer is None or writer.finished or writer.failed:
        return
    for stage in list(writer.expected):  # a model handed over already whose last writes still run
        writer.settle(stage)  # (the interpreter joins their threads first; any other caller may not)
    if "unet" in writer.done:
        thread = writer.finish()
        if thread is not None:
            thread.join()
