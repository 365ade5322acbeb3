"""Streaming a model through a ring buffer on the device, its units copied on the side stream
just ahead of the compute that needs them (the streamed U-Net of a small budget)."""

from __future__ import annotations

import torch
from torch import nn

from .placement import Placement


def ring_size(placement: Placement, name: str, resident: frozenset[int], ring_bytes: int) -> int:
    """A streamer's ring in bytes: the plan's, or the largest streamed unit where that is more."""
    units = placement.models[name]
    return max(ring_bytes, max((u.nbytes for i, u in enumerate(units) if i not in resident), default=0))


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

    ``ring``: a buffer the caller owns, at least :func:`ring_size` bytes, for streamers that run
    one after another (one per pass, as a captured pass needs: a CUDA graph records the ring's
    address, so every replay must find its units at the same place). A streamer of its own
    ring allocates it on entry and frees it on exit; a caller's ring stays the caller's.
    """

    def __init__(
        self,
        placement: Placement,
        name: str,
        modules: list[nn.Module],
        resident: frozenset[int],
        ring_bytes: int,
        passes: int,
        ring: torch.Tensor | None = None,
    ):
        self.p = placement
        self.units = placement.models[name]
        self.name = name
        self.modules = modules
        self.resident = resident
        self.order = [i for i in range(len(self.units)) if i not in resident]
        self.ring_bytes = ring_size(placement, name, resident, ring_bytes)
        self.passes = passes
        self.total = passes * len(self.order)
        """Streamed unit runs over the whole render: the prefetch stops after this many copies."""
        self.hooks: list = []
        self.ring: torch.Tensor | None = None
        self._given = ring
        if ring is not None and ring.numel() < self.ring_bytes:
            raise ValueError(f"a ring of {ring.numel()} bytes for units that need {self.ring_bytes}")
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
            self.ring = self._given
            if self.ring is None:
                self.ring = torch.empty(self.ring_bytes, dtype=torch.uint8, device=self.p.device)
            if self.p.cuda:  # the ring's memory may have held earlier compute: copies come after it
                self.p.copy_stream.wait_stream(torch.cuda.current_stream(self.p.device))
            try:
                for i in self.order:
                    self.hooks.append(self.modules[i].register_forward_pre_hook(self._pre(i)))
                    self.hooks.append(self.modules[i].register_forward_hook(self._post(i)))
                self._fill()
            except BaseException:  # a copy refused (in a capture): no hook may outlive this streamer
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for i in self.order:
            self.units[i].bind(self.units[i].host)
        self.p.join()  # an error mid-pass can leave prefetches in flight: order them before what follows
        self.ring = self._given = None  # recorded on the copy stream: freed (if ours) once the copies are done
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
