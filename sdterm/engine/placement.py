"""Where each model lives, and what each stage cost in memory and time.

Models are kept on the host (in the run dtype) between renders. A stage moves its model to the
device, runs, and puts the host tensors back without a device-to-host copy (the weights never
change). ``StageMeter`` resets torch's peak counters at the start of a stage and reports them at
its end.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .events import Emit, StageFinished, StageStarted, StageStats


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


def host_rss() -> int:
    """Current resident set size in bytes (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass
class Placement:
    """Moves modules between the host and the device, keeping the host copy as the source of truth."""

    device: torch.device
    _host: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def upload(self, module: nn.Module) -> nn.Module:
        if self.device.type == "cpu" or id(module) in self._host:
            return module
        host = {}
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            host[name] = t.data
        self._host[id(module)] = host
        return module.to(self.device, non_blocking=True)

    def offload(self, module: nn.Module) -> None:
        host = self._host.pop(id(module), None)
        if host is None:
            return
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            t.data = host[name]

    def on_device(self, module: nn.Module) -> bool:
        return self.device.type == "cpu" or id(module) in self._host


class StageMeter:
    """Times a stage and reads its memory figures; emits StageStarted/StageFinished."""

    def __init__(self, stage: str, device: torch.device, emit: Emit):
        self.stage = stage
        self.device = device
        self.emit = emit
        self.cuda = device.type == "cuda"
        self.load_seconds = 0.0
        self.run_seconds = 0.0
        self._t = time.perf_counter()
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.resident_start = torch.cuda.memory_allocated(device) if self.cuda else None
        emit(StageStarted(stage, "loading"))

    def _lap(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self._t = now - self._t, now
        return elapsed

    def loaded(self) -> None:
        self.load_seconds += self._lap()
        self.emit(StageStarted(self.stage, "running"))

    def finish(
        self,
        *,
        cache: str | None = None,
        cache_texts: dict[str, str] | None = None,
        skipped: bool = False,
        note: str = "",
    ) -> StageStats:
        self.run_seconds += self._lap()
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
        self.emit(StageFinished(stats))
        return stats
