"""CUDA graphs of the U-Net forward: a render's shapes are static, so after one eager call at a
shape the whole forward (about a thousand kernels) is captured once and replayed, and the CPU no
longer launches kernel by kernel (at 512x512 on an H100 that launching is half of a step).

A graph records device addresses: the weights' (so a graph is only valid while the U-Net's units
stay where they were when it was captured: :class:`UNetGraphs` is keyed by those addresses and
drops every graph when they change) and its inputs' (static buffers the caller's tensors are
copied into). The activations live in a memory pool private to the graphs, shared by all of
them (they never run at the same time; each output is copied out before the next replay).

A streamed U-Net is captured one pass at a time with its copies: the forward the stage hands
over streams every unit through the stage's ring from scratch (``unet_stage``), so a graph holds
the copy schedule too, on the side stream, ordered against the compute by the captured events.

What a replay computes is what the eager forward computes: the same kernels on the same inputs
(tests/test_cuda.py compares whole renders, graphed and eager, bit for bit).
"""

from __future__ import annotations

import gc
from collections import OrderedDict, deque
from typing import Callable

import torch

from .cuda_start import wait_started
from .cudart import clear_error

REASONS_KEPT = 16
"""Lines of ``skipped`` and ``failures`` kept (the newest): a staged plan without room adds one
every render of a long app session."""
MAX_GRAPHS = 4
"""Graphs kept at once (per input signature: the batch of two, the split passes, a hires pass)."""
POOL_FACTOR = 1.5
"""A graph's private pool against the eager forward's activation peak (measured on an H100 at
512x512, batch 2: a 234 MiB pool for a 158 MiB eager peak)."""

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _Graph:
    def __init__(self, forward: Forward, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pool):
        # Static inputs: every replay reads these addresses.
        self.x, self.t, self.context = x.clone(), t.clone(), context.clone()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (the UI's memory sampling) cannot break the
        # capture. Nor may this thread's garbage collector: a model dropped earlier, collected
        # mid-capture, would unregister its page-locked host memory, a call a capture forbids.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.out = forward(self.x, self.t, self.context)
        finally:
            if collecting:
                gc.enable()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.context.copy_(context)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites ``out``


def signature(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple:
    return (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, tuple(context.shape), context.dtype)


class UNetGraphs:
    """The U-Net's CUDA graphs on one device, kept between renders while its weights stay put.

    ``bind(forward, weights, room)`` gives the callable a stage runs: per input signature the
    first call in the process runs eagerly (a warm-up: it loads the kernels and picks the
    algorithms; none where :meth:`rehearse` made it), the next captures a graph when its pool
    (estimated from that call's peak) fits ``room`` (bytes the budget leaves; None: no limit) and
    replays it, every later call replays. A signature whose pool does not
    fit, or whose capture runs out of memory, runs eagerly until the graphs are cleared.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.weights: tuple = ()
        self.graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()
        """Signature -> graph; None: this signature runs eagerly (no room, or its capture failed)."""
        self._peaks: dict[tuple, int] = {}
        """Signature -> its first (eager) call's activation peak: device bytes above what was
        allocated before it (an over-estimate where the stage peaked higher before it). Kept
        when the graphs go: the kernels and algorithms it loaded stay loaded in the process."""
        self._pool = None
        self.captures = 0
        """Graphs captured so far (tests and the bench read it)."""
        self.held = 0
        """Device bytes the graphs' pool took when they were captured (what they hold)."""
        self.skipped: deque[str] = deque(maxlen=REASONS_KEPT)
        """Signatures left eager for want of room, one line each (why)."""
        self.failures: deque[str] = deque(maxlen=REASONS_KEPT)
        """Why captures failed (each such signature ran eagerly): one line each."""

    def clear(self) -> None:
        """Drop every graph (and so their memory pool). The signatures' peaks stay: a signature
        this process has run before needs no warm-up call, its next render captures at once."""
        self.graphs.clear()
        self._pool = None
        self.weights = ()
        self.held = 0

    def bind(self, forward: Forward, weights: tuple, room: int | None) -> Forward:
        if weights != self.weights:
            self.clear()  # the weights moved: every graph reads the old addresses
            self.weights = weights

        def run(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            key = signature(x, t, context)
            if key in self.graphs:
                graph = self.graphs[key]
                self.graphs.move_to_end(key)
            elif key in self._peaks:
                graph = self._capture(forward, key, x, t, context, room)
            else:
                return self.rehearse(forward, x, t, context)
            return graph(x, t, context) if graph is not None else forward(x, t, context)

        return run

    def rehearse(self, forward: Forward, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """An eager call, its activation peak kept for its signature: the warm-up a signature
        needs before its capture. The engine also calls it with a stand-in U-Net while the real
        one is converted (engine/model_warm.py), so the first real call captures at once."""
        before = torch.cuda.memory_allocated(self.device)
        out = forward(x, t, context)
        self._peaks[signature(x, t, context)] = max(torch.cuda.max_memory_allocated(self.device) - before, 0)
        return out

    def _capture(self, forward: Forward, key: tuple, x, t, context, room: int | None) -> _Graph | None:
        while len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)
        if room is not None and POOL_FACTOR * self._peaks[key] > room:
            self.graphs[key] = None
            self.skipped.append(f"no room: a pool of about {POOL_FACTOR * self._peaks[key] / 2**20:.0f} MiB, "
                                f"{room / 2**20:.0f} MiB left in the budget")
            return None
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        wait_started(self.device)  # the process's first calls (cuda_start.py) share no capture
        before = torch.cuda.memory_reserved(self.device)
        try:
            graph = _Graph(forward, x, t, context, self._pool)
            self.held += max(torch.cuda.memory_reserved(self.device) - before, 0)
        except RuntimeError as exc:  # out of memory (an OutOfMemoryError), or an op that cannot be captured
            graph = None
            while exc.__context__ is not None:  # the first error (an invalidated capture fails what follows)
                exc = exc.__context__
            self.failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            clear_error()
            torch.cuda.empty_cache()
        self.graphs[key] = graph
        self.captures += graph is not None
        return graph


__all__ = ["MAX_GRAPHS", "POOL_FACTOR", "UNetGraphs", "signature"]
