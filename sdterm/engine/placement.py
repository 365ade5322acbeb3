"""Where each model lives, and what each stage cost in memory and time.

Models are kept on the host (in the run dtype) between renders. A stage moves its model to the
device, runs, and puts the host tensors back without a device-to-host copy (the weights never
change). ``StageMeter`` resets torch's peak counters at the start of a stage and reports them at
its end.

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

import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .events import Emit, MemorySample, StageFinished, StageStarted, StageStats


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


def use_expandable_segments() -> None:
    """Ask torch's caching allocator for expandable segments: freed blocks of different sizes
    coalesce instead of fragmenting, so reserved memory stays close to allocated (what matters on
    a 4 GB card). Harmless where unsupported; PYTORCH_CUDA_ALLOC_CONF set by the user wins."""
    import os

    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):
        pass


def run_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on the CPU (CPU half-precision convolutions are slow and inexact)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def host_rss() -> int:
    """Resident set size in bytes: current on Linux (/proc) and Windows (the working set), the
    peak from getrusage elsewhere; 0 where none of these can be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    if sys.platform == "win32":
        return _windows_working_set()
    try:
        import resource  # POSIX only: imported here so the engine imports on Windows
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _windows_working_set() -> int:
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):  # PROCESS_MEMORY_COUNTERS
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t)
            for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                         "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")
        ]

    try:
        counters = Counters()
        counters.cb = ctypes.sizeof(Counters)
        process = ctypes.windll.kernel32.GetCurrentProcess()
        if ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
            return int(counters.WorkingSetSize)
    except (AttributeError, OSError):
        pass
    return 0


COMPUTE = object()
"""``Placement.copy_async(after=COMPUTE)``: the copy waits for the compute stream's queued work."""

ALIGN = 256
"""Byte alignment of every tensor inside a packed unit (keeps kernels on their fast paths)."""


@dataclass
class _Slot:
    owner: nn.Module
    name: str
    is_param: bool
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    nbytes: int


class Unit:
    """Some modules' parameters and buffers packed into one flat byte buffer on the host (pinned
    when the device is a GPU), so the unit moves to the device with a single copy."""

    def __init__(self, modules: list[nn.Module], pin: bool):
        slots: list[_Slot] = []
        seen: set[int] = set()
        offset = 0
        for module in modules:
            for owner in module.modules():
                for name, t in list(owner._parameters.items()) + list(owner._buffers.items()):
                    if t is None or id(t) in seen:
                        continue
                    seen.add(id(t))
                    nbytes = t.numel() * t.element_size()
                    slots.append(_Slot(owner, name, name in owner._parameters, t.shape, t.dtype, offset, nbytes))
                    offset += -(-nbytes // ALIGN) * ALIGN
        self.slots = slots
        self.nbytes = max(offset, ALIGN)
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        for slot in slots:
            src = self._get(slot)
            self._view(self.host, 0, slot).copy_(src)
            self._set(slot, self._view(self.host, 0, slot))  # the old tensor is freed here
        self.device_buf: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None

    @staticmethod
    def _get(slot: _Slot) -> torch.Tensor:
        table = slot.owner._parameters if slot.is_param else slot.owner._buffers
        return table[slot.name].data

    @staticmethod
    def _set(slot: _Slot, view: torch.Tensor) -> None:
        if slot.is_param:
            slot.owner._parameters[slot.name].data = view
        else:
            slot.owner._buffers[slot.name] = view

    @staticmethod
    def _view(flat: torch.Tensor, start: int, slot: _Slot) -> torch.Tensor:
        return flat[start + slot.offset : start + slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)

    def bind(self, flat: torch.Tensor, start: int = 0) -> None:
        """Point every tensor of the unit at its place in ``flat`` (host, device buffer or ring)."""
        for slot in self.slots:
            self._set(slot, self._view(flat, start, slot))


class Placement:
    """Moves packed models between pinned host memory and the device.

    ``register(name, module, units)`` packs a model once (units: the sub-modules that move
    separately, for streaming; default one unit). ``upload`` (optionally on the side stream, as a
    prefetch), ``offload`` and ``streamed`` execute what the planner decided.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            use_expandable_segments()
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.models: dict[str, list[Unit]] = {}

    def register(self, name: str, module: nn.Module, units: list[nn.Module] | None = None) -> None:
        if name not in self.models:
            self.models[name] = [Unit([m], pin=self.cuda) for m in (units or [module])]

    def on_device(self, name: str) -> bool:
        return all(u.device_buf is not None for u in self.models.get(name, []))

    def device_bytes(self, name: str) -> int:
        return sum(u.nbytes for u in self.models.get(name, []) if u.device_buf is not None)

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

    def pending_copies(self) -> bool:
        """Whether the side stream still has unfinished work (a query, never a wait)."""
        return self.cuda and not self.copy_stream.query()

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

    def offload_all(self) -> None:
        for name in self.models:
            self.offload(name)

    def streamed(
        self, name: str, modules: list[nn.Module], resident: frozenset[int], ring_bytes: int, passes: int
    ) -> "RingStreamer":
        return RingStreamer(self, name, modules, resident, ring_bytes, passes)


class RingStreamer:
    """Runs a model whose resident units stay on the device while the others flow through a ring
    buffer: unit k+1, k+2, ... are copied on the side stream while unit k computes.

    The ring is a FIFO of regions. A region is reused only after the compute stream has finished
    the unit that occupied it (an event the copy stream waits on), so device memory never exceeds
    resident units + ring, and neither stream ever blocks the CPU. ``passes`` is how many times
    the model will run (steps x forward passes per step): units are prefetched across pass
    boundaries, but never past the last pass, so nothing is copied that no pass will use. On exit
    the compute stream joins the copy stream and the ring (recorded on the copy stream) is freed:
    no copy is pending and none can write into memory the allocator hands out later. Use as a
    context manager.
    """

    def __init__(
        self,
        placement: Placement,
        name: str,
        modules: list[nn.Module],
        resident: frozenset[int],
        ring_bytes: int,
        passes: int,
    ):
        self.p = placement
        self.units = placement.models[name]
        self.name = name
        self.modules = modules
        self.resident = resident
        self.order = [i for i in range(len(self.units)) if i not in resident]
        self.ring_bytes = max(ring_bytes, max((self.units[i].nbytes for i in self.order), default=0))
        self.passes = passes
        self.total = passes * len(self.order)
        """Streamed unit runs over the whole render: the prefetch stops after this many copies."""
        self.hooks: list = []
        self.ring: torch.Tensor | None = None
        self.fifo: list[list] = []  # [unit, start, end, ready_event, release_event | None]
        self.next = 0  # copies issued so far; the next one is of self.order[self.next % len(order)]
        self.copied_bytes = 0
        self.last_copy: torch.cuda.Event | None = None
        """The newest copy's completion event (tests check it has completed after a render)."""
        self._released: object = None
        """The newest release event of regions retired since the last copy: the next copy waits
        for it (release events are ordered, so the newest covers every region retired before)."""

    def __enter__(self) -> "RingStreamer":
        self.p.upload(self.name, units=list(self.resident))
        if self.order:
            self.ring = torch.empty(self.ring_bytes, dtype=torch.uint8, device=self.p.device)
            if self.p.cuda:  # the ring's memory may have held earlier compute: copies come after it
                self.p.copy_stream.wait_stream(torch.cuda.current_stream(self.p.device))
            for i in self.order:
                self.hooks.append(self.modules[i].register_forward_pre_hook(self._pre(i)))
                self.hooks.append(self.modules[i].register_forward_hook(self._post(i)))
            self._fill()
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for i in self.order:
            self.units[i].bind(self.units[i].host)
        self.p.join()  # an error mid-pass can leave prefetches in flight: order them before what follows
        self.ring = None  # recorded on the copy stream by copy_async: freed once the copies are done
        self.fifo.clear()

    # ---- the ring ----------------------------------------------------------------------------

    def _place(self, size: int) -> int | None:
        """Start of a free region of ``size`` bytes, retiring computed regions oldest first as
        needed (their release is remembered for the next copy to wait on); None while the ring
        is full of units not yet run."""
        while True:
            if not self.fifo:
                return 0
            tail, head = self.fifo[0][1], self.fifo[-1][2]
            if self.fifo[-1][1] >= self.fifo[0][1]:  # occupied [tail, head): free [head, R) + [0, tail)
                if head + size <= self.ring_bytes:
                    return head
                if size <= tail:
                    return 0
            elif head + size <= tail:  # wrapped: occupied [tail, R) + [0, head), free [head, tail)
                return head
            oldest = self.fifo[0]
            if oldest[4] is None:
                return None
            self._released = oldest[4]
            self.fifo.pop(0)

    def _fill(self) -> None:
        """Prefetch upcoming streamed units in run order (the next pass starts over) while the
        ring has room and a pass still needs them."""
        while self.next < self.total and sum(1 for e in self.fifo if e[4] is None) < len(self.order):
            idx = self.order[self.next % len(self.order)]
            unit = self.units[idx]
            start = self._place(unit.nbytes)
            if start is None:
                return
            region = self.ring[start : start + unit.nbytes]
            ready = None
            if self.p.cuda:
                # Free space never used since __enter__ needs no wait; a region that held a unit
                # waits for that unit's compute (the newest release covers it).
                ready = self.p.copy_async(region, unit.host, after=self._released)
                self._released = None
                self.last_copy = ready
            else:
                region.copy_(unit.host)
            self.copied_bytes += unit.nbytes
            self.fifo.append([idx, start, start + unit.nbytes, ready, None])
            self.next += 1

    def _entry(self, idx: int) -> list:
        for entry in self.fifo:
            if entry[0] == idx and entry[4] is None:
                return entry
        raise RuntimeError(
            f"streamed unit {idx} was not prefetched (the model ran more than the {self.passes} passes planned?)"
        )

    def _pre(self, idx: int):
        def hook(_module, _args):
            if not any(e[0] == idx and e[4] is None for e in self.fifo):
                self._fill()
            entry = self._entry(idx)
            if entry[3] is not None:
                torch.cuda.current_stream(self.p.device).wait_event(entry[3])
            self.units[idx].bind(self.ring, entry[1])

        return hook

    def _post(self, idx: int):
        def hook(_module, _args, _out):
            entry = self._entry(idx)
            done: object = True
            if self.p.cuda:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.p.device))
            entry[4] = done
            self._fill()

        return hook


def memory_sample(stage: str, device: torch.device) -> MemorySample:
    """Cheap: no device synchronisation (cudaMemGetInfo and torch's counters)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return MemorySample(
            stage, torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device), free, total, host_rss()
        )
    return MemorySample(stage, None, None, None, None, host_rss())


class StageMeter:
    """Times a stage and reads its memory figures; emits StageStarted/StageFinished.

    On CUDA the laps are events recorded on the compute stream, read once when the stage
    finishes: nothing here waits for the device mid-stage, so a prefetch the planner overlapped
    with this stage stays overlapped (and its copy time is not billed to this stage).
    """

    def __init__(self, stage: str, device: torch.device, emit: Emit):
        self.stage = stage
        self.device = device
        self.emit = emit
        self.cuda = device.type == "cuda"
        self.load_seconds = 0.0
        self.run_seconds = 0.0
        self._marks: list = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)  # the allocator's own counters: no device sync
        self._mark()
        self.resident_start = torch.cuda.memory_allocated(device) if self.cuda else None
        emit(StageStarted(stage, "loading"))

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def _seconds(self, a: int, b: int) -> float:
        if self.cuda:
            return self._marks[a].elapsed_time(self._marks[b]) / 1000.0
        return self._marks[b] - self._marks[a]

    def loaded(self) -> None:
        self._mark()
        self.emit(StageStarted(self.stage, "running"))
        self.emit(memory_sample(self.stage, self.device))

    def finish(
        self,
        *,
        cache: str | None = None,
        cache_texts: dict[str, str] | None = None,
        skipped: bool = False,
        note: str = "",
    ) -> StageStats:
        if len(self._marks) == 1:  # finished without a separate loading phase
            self._mark()
        self._mark()
        if self.cuda:
            self._marks[-1].synchronize()  # the stage's own work, on the compute stream only
        self.load_seconds = self._seconds(0, 1)
        self.run_seconds = self._seconds(1, 2)
        if self.cuda:
            free, total = torch.cuda.mem_get_info(self.device)
            peak_alloc = torch.cuda.max_memory_allocated(self.device)
            peak_res = torch.cuda.max_memory_reserved(self.device)
            resident_end = torch.cuda.memory_allocated(self.device)
        else:
            free = total = peak_alloc = peak_res = resident_end = None
        stats = StageStats(
            stage=self.stage,
            device=str(self.device),
            load_seconds=self.load_seconds,
            run_seconds=self.run_seconds,
            peak_allocated=peak_alloc,
            peak_reserved=peak_res,
            resident_start=self.resident_start,
            resident_end=resident_end,
            device_free=free,
            device_total=total,
            host_rss=host_rss(),
            cache=cache,
            cache_texts=cache_texts,
            skipped=skipped,
            note=note,
        )
        self.emit(memory_sample(self.stage, self.device))
        self.emit(StageFinished(stats))
        return stats
