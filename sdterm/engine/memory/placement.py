"""Where each model lives: packed pinned host units, uploads (plain or prefetched on the side
stream) and offloads, the device and its run dtype.

Models are kept on the host (in the run dtype) between renders. A stage moves its model to the
device, runs, and puts the host tensors back without a device-to-host copy (the weights never
change).

Streams. Everything computes on the current ("compute") stream; uploads that should overlap
compute run on one side ("copy") stream. Two rules keep that safe, and every side-stream write
goes through :meth:`Placement.copy_async`, which applies both:

1. *Write after use*: a side-stream copy into memory the compute stream may have used (a block
   the allocator handed out again, a ring region) first waits for that use (``wait_stream`` or
   the region's release event).
2. *Free after write*: a buffer the side stream writes is recorded on the side stream
   (``record_stream``), so the caching allocator does not hand its memory to anyone, nor return
   it to the driver in ``empty_cache``, until the copies issued before the free have finished.

And at the end of a stage the compute stream joins the side stream (:meth:`Placement.join`): no
copy is left pending behind a render, whatever happened during it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cuda_start import start_cuda
from .cudart import copy_to_device


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. An unavailable 'cuda' is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    if dev.type not in ("cuda", "cpu"):
        raise RuntimeError(f"unsupported device {name!r}: use auto, cpu or cuda")
    return dev


def run_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU (CPU half-precision convolutions are slow and inexact)."""
    return torch.float16 if device.type == "cuda" else torch.float32


COMPUTE = object()
"""``Placement.copy_async(after=COMPUTE)``: the copy waits for the compute stream's queued work."""

ALIGN = 256
"""Byte alignment of every tensor inside a packed unit (keeps kernels on their fast paths)."""


@dataclass
class Slot:
    """Where one parameter or buffer sits in its unit's flat byte buffer."""

    owner: nn.Module
    name: str
    is_param: bool
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    nbytes: int
    channels_last: bool = False
    """A convolution weight stored (o, kh, kw, i): the tensor is its channels-last view."""

    @property
    def table(self) -> dict:
        """The owner's table that holds the tensor: its parameters or its buffers."""
        return self.owner._parameters if self.is_param else self.owner._buffers


CHANNELS_LAST_STAGES = frozenset({"unet", "vae"})
"""Models whose convolution weights are laid out channels-last in half precision (the GPU's run
dtype): cuDNN's NHWC kernels run the U-Net 10-15% faster on an H100, and their first call in a
process costs 0.7 s instead of 4.7 s (measured with 2.11+cu130). The VAE decoder's too: its
512x512 fp16 decode peaks 162 MiB lower (480 MiB above its weights, against 642 NCHW) and its first
call in a process is cheaper (0.44 s against 0.55 s); with PyTorch's GroupNorm it cost 6 ms more
per decode (28.5 ms against 22.4), and since networks/norm.py (which keeps the layout) it is the
faster one too (10.7 ms against 12.3; H100, 2026-11-27). The CPU's fp32 stays NCHW, and so does the
VAE encoder (img2img only)."""


def channels_last(stage: str, dtype: torch.dtype) -> bool:
    """Whether ``stage``'s units in ``dtype`` lay their 4-D weights out channels-last; the one
    rule both :class:`Unit` and the model cache's layout follow."""
    return stage in CHANNELS_LAST_STAGES and dtype in (torch.float16, torch.bfloat16)


def unit_slots(modules: list[nn.Module], dtype: torch.dtype | None = None, *,
               last: bool = False) -> tuple[list[Slot], int]:
    """The layout of a unit holding ``modules``: each distinct parameter and buffer at an
    ``ALIGN``-byte offset, in module order; and the unit's size in bytes. ``dtype``: the dtype the
    floating tensors will have (for a model still on the meta device; None: as they are).
    ``last``: 4-D floating tensors (convolution weights) channels-last (:func:`channels_last`).

    The one layout function: :class:`Unit` packs with it and the model cache
    (``loading/packed.py``) stores and reads with it, so they can never disagree."""
    slots: list[Slot] = []
    seen: set[int] = set()
    offset = 0
    for module in modules:
        for owner in module.modules():
            for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
                nbytes = t.numel() * dt.itemsize
                cl = last and t.dim() == 4 and t.is_floating_point()
                slots.append(Slot(owner, name, name in owner._parameters, t.shape, dt, offset, nbytes, cl))
                offset += -(-nbytes // ALIGN) * ALIGN
    return slots, max(offset, ALIGN)


def slot_view(flat: torch.Tensor, start: int, slot: Slot) -> torch.Tensor:
    """The tensor of ``slot`` inside the flat byte buffer ``flat`` whose unit begins at ``start``."""
    flat = flat[start + slot.offset : start + slot.offset + slot.nbytes].view(slot.dtype)
    if slot.channels_last:
        o, i, kh, kw = slot.shape
        return flat.view(o, kh, kw, i).permute(0, 3, 1, 2)  # (o, kh, kw, i) -> (o, i, kh, kw), NHWC strides
    return flat.view(slot.shape)


def get_tensor(slot: Slot) -> torch.Tensor:
    return slot.table[slot.name].data


def set_tensor(slot: Slot, view: torch.Tensor) -> None:
    """Point the slot's parameter (or buffer) at ``view``."""
    if slot.is_param:
        param = slot.owner._parameters[slot.name]
        if param.is_meta:  # a model built on the meta device: a real parameter in its place
            slot.owner._parameters[slot.name] = nn.Parameter(view, requires_grad=False)
        else:
            param.data = view
    else:
        slot.owner._buffers[slot.name] = view


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat host byte buffer, page-locked at its exact size when ``pin`` (the device is a GPU;
    torch's pinned allocator would round it up to a power of two: see ``host_memory.py``)."""
    from .host_memory import host_buffer as allocate

    return allocate(nbytes, pin)


class Unit:
    """Some modules' parameters and buffers packed into one flat byte buffer on the host (pinned
    when the device is a GPU), so the unit moves to the device with a single copy.

    ``host``: a buffer the modules' tensors already are views of, each at its place in the layout
    (a model read from the model cache or converted straight into its units): adopted as it is,
    nothing copied. Otherwise (or if any tensor is not where the layout puts it) a new buffer is
    allocated and every tensor copied into it."""

    def __init__(self, modules: list[nn.Module], pin: bool, host: torch.Tensor | None = None, *, last: bool = False):
        self.slots, self.nbytes = unit_slots(modules, last=last)
        self._binds: list[tuple] | None = None
        if host is not None and self._laid_out_in(host):
            self.host = host
        else:
            self.host = host_buffer(self.nbytes, pin)
            for slot in self.slots:
                view = slot_view(self.host, 0, slot)
                view.copy_(get_tensor(slot))
                set_tensor(slot, view)  # the old tensor is freed here
        self.device_buf: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    def _laid_out_in(self, host: torch.Tensor) -> bool:
        if host.numel() != self.nbytes or host.dtype != torch.uint8:
            return False
        for slot in self.slots:
            t = get_tensor(slot)
            laid = slot_view(host, 0, slot)
            if t.data_ptr() != laid.data_ptr() or t.dtype != slot.dtype or t.stride() != laid.stride():
                return False
        return True

    def bind(self, flat: torch.Tensor, start: int = 0) -> None:
        """Point every tensor of the unit at its place in ``flat`` (host, device buffer or ring).

        What :func:`slot_view` gives, made faster: a streamed U-Net rebinds about 700 tensors
        every step, on the CPU's critical path. One typed view of the unit's bytes per dtype,
        then one ``as_strided`` per tensor (strides and offsets worked out once)."""
        if self._binds is None:
            self._binds = [_bind_entry(slot) for slot in self.slots]
        typed: dict[torch.dtype, tuple[torch.Tensor, int]] = {}
        # Ordinary tensors even when bound inside a render's inference mode (a streamed pass):
        # views made there are inference tensors, which no one may use as weights outside it.
        with torch.inference_mode(False):
            for table, name, is_param, dtype, shape, stride, offset in self._binds:
                view = typed.get(dtype)
                if view is None:
                    t = flat[start : start + self.nbytes].view(dtype)
                    view = typed[dtype] = (t, t.storage_offset())
                t = view[0].as_strided(shape, stride, view[1] + offset)
                if is_param:
                    table[name].data = t
                else:
                    table[name] = t


def _bind_entry(slot: Slot) -> tuple:
    """(the owner's table, name, is a parameter, dtype, shape, strides, offset in elements) of a
    slot: what :meth:`Unit.bind` needs to point its tensor anywhere."""
    probe = slot_view(torch.empty(slot.offset + slot.nbytes, dtype=torch.uint8, device="meta"), 0, slot)
    itemsize = slot.dtype.itemsize
    return slot.table, slot.name, slot.is_param, slot.dtype, tuple(probe.shape), probe.stride(), slot.offset // itemsize


class Placement:
    """Moves packed models between pinned host memory and the device.

    ``register(name, module, units)`` packs a model once (units: the sub-modules that move
    separately, for streaming; default one unit). ``upload`` (optionally on the side stream, as a
    prefetch), ``offload`` and ``streamed`` execute what the planner decided.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._copy_stream: torch.cuda.Stream | None = None
        if self.cuda:
            start_cuda(device)  # at once, where the command did not start it earlier
        self.models: dict[str, list[Unit]] = {}

    @property
    def copy_stream(self) -> torch.cuda.Stream | None:
        """The side stream uploads that overlap compute run on (None on the CPU); made on first use."""
        if self.cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        return self._copy_stream

    def register(self, name: str, module: nn.Module, units: list[nn.Module] | None = None,
                 hosts: list[torch.Tensor] | None = None) -> None:
        """``hosts``: per unit, the host buffer its tensors already live in (adopted, not copied)."""
        if name not in self.models:
            parts = units or [module]
            given = hosts if hosts is not None and len(hosts) == len(parts) else [None] * len(parts)
            dtype = next((t.dtype for t in module.parameters() if t.is_floating_point()), torch.float32)
            last = channels_last(name, dtype)
            self.models[name] = [Unit([m], pin=self.cuda, host=h, last=last) for m, h in zip(parts, given)]

    def on_device(self, name: str) -> bool:
        return all(u.device_buf is not None for u in self.models.get(name, []))

    def device_bytes(self, name: str) -> int:
        return sum(u.nbytes for u in self.models.get(name, []) if u.device_buf is not None)

    def held_bytes(self) -> int:
        """Device bytes every model's units hold now."""
        return sum(self.device_bytes(name) for name in self.models)

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after: object = COMPUTE):
        """Copy ``src`` (pinned host) into ``dst`` (device) on the side stream; returns the event
        that marks the copy done (None on the CPU, where the copy is synchronous).

        The copy first waits for ``after``: by default all work queued on the compute stream so
        far (``dst`` may be memory that work used), or an event (the release of the region it
        overwrites), or None when the caller has already ordered it. ``dst`` is recorded on the
        side stream: the allocator can neither reuse nor release its memory before the copy has
        finished, even if ``dst`` is freed at once.
        """
        if not self.cuda:
            dst.copy_(src)
            return None
        stream = self.copy_stream
        if after is COMPUTE:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        elif after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            if torch.cuda.is_current_stream_capturing():
                # torch refuses registered host memory in a capture (it does not know it as pinned)
                copy_to_device(dst, src, stream)
            else:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        dst.record_stream(stream)
        return done

    def join(self) -> None:
        """Order everything the compute stream does from now on after every copy issued so far
        (no CPU stall). Called at the end of each stage: no copy stays pending behind a render."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def upload(self, name: str, *, prefetch: bool = False, units: list[int] | None = None) -> None:
        """Copy the model (or some of its units) to the device. With ``prefetch`` the copy runs on
        the side stream and overlaps whatever the compute stream is doing; ``wait`` joins it."""
        for i, unit in enumerate(self.models[name]):
            if (units is not None and i not in units) or unit.device_buf is not None:
                continue
            buf = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
            if prefetch:
                unit.ready = self.copy_async(buf, unit.host)
            else:
                buf.copy_(unit.host, non_blocking=True)
            unit.device_buf = buf
            unit.bind(buf)

    def wait(self, name: str) -> None:
        """Make the compute stream wait for a prefetch of ``name`` (no CPU stall)."""
        for unit in self.models.get(name, []):
            if unit.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(unit.ready)
                unit.ready = None

    def offload(self, name: str) -> None:
        """Back to the host copy; the device memory is released (no device-to-host copy: the
        weights never change). Safe with a prefetch still in flight: its buffer was recorded on
        the side stream, so the allocator waits for the copy before reusing the memory."""
        for unit in self.models.get(name, []):
            if unit.device_buf is not None:
                unit.bind(unit.host)
                unit.device_buf = None
                unit.ready = None

    def forget(self, name: str) -> None:
        """Drop ``name``'s units (its model is being replaced: a new VAE file); the next
        ``register`` packs the new model."""
        self.offload(name)
        self.models.pop(name, None)

    def offload_modules(self, name: str, modules: set[nn.Module]) -> None:
        """Send back to their host copy just the units of ``name`` that hold any of ``modules``
        (their host weights are about to change: a LoRA merge); the other units stay where they
        are, and the next upload copies only what was sent back."""
        for unit in self.models.get(name, []):
            if unit.device_buf is not None and any(slot.owner in modules for slot in unit.slots):
                unit.bind(unit.host)
                unit.device_buf = None
                unit.ready = None

    def offload_all(self) -> None:
        for name in self.models:
            self.offload(name)
