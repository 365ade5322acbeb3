"""What each stage cost: time (CUDA events on the compute stream, never a device-wide sync) and
memory (torch's allocator counters, the device's free memory, the host's resident set)."""

from __future__ import annotations

import os
import sys
import time

import torch

from ..events import Emit, MemorySample, StageFinished, StageStarted, StageStats


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
