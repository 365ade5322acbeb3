"""The device between measurements, for sdterm's rows and diffusers' alike: wait for it, empty it
and reset its peak counters, and the errors that end one row (out of memory, a budget too small)
rather than the whole run. torch and the engine are imported inside the functions."""

from __future__ import annotations

import gc


def sync_device(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clean_device(device) -> None:
    """Drop garbage and cached device blocks, and reset the peak counters."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def budget_errors() -> tuple[type[BaseException], ...]:
    """Errors that end one row, not the run: out of memory, and a budget too small for any plan."""
    import torch

    errors: list[type[BaseException]] = [torch.cuda.OutOfMemoryError]
    try:  # the VRAM budget's errors, where the engine has them
        from ..engine.memory.planner import BudgetTooSmall

        errors.append(BudgetTooSmall)
    except ImportError:
        pass
    from ..engine import pipeline

    if isinstance(getattr(pipeline, "OutOfMemory", None), type):
        errors.append(pipeline.OutOfMemory)
    return tuple(errors)


def error_line(exc: BaseException) -> str:
    import torch

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ("out of memory: " + first) if isinstance(exc, torch.cuda.OutOfMemoryError) else first


def release_device(engine) -> None:
    """Send every model the engine keeps on the device (resident plans) back to the host."""
    placement = getattr(engine, "placement", None)
    if hasattr(placement, "offload_all"):
        placement.offload_all()
    clean_device(engine.device)


def note_peaks(row, device) -> None:
    """Raise ``row``'s peak allocated / reserved bytes to the device's peaks since they were last
    reset (a render just timed); nothing on the CPU."""
    import torch

    if device.type == "cuda":
        row.peak_allocated = max(row.peak_allocated or 0, torch.cuda.max_memory_allocated(device))
        row.peak_reserved = max(row.peak_reserved or 0, torch.cuda.max_memory_reserved(device))
