"""The CUDA driver's start and the device's primary context, made on a thread before torch is
imported (no torch here).

``cuInit`` and the creation of a device's primary context take a large part of a second (an
H100, 2026-11-27: torch's ``is_available`` on the start thread, which runs ``cuInit``, held the
main thread for 0.19 s). Made through torch they also hold Python's GIL the whole time: torch's
bindings for them do not release it, so the thread meant to run beside the command stopped it.
Called through ``ctypes`` (which releases the GIL around a foreign call) they run beside torch's
import instead, and torch finds the driver started and the context made: CUDA's runtime, which
torch uses, takes the device's primary context, the one made here.

A machine without the driver (no ``libcuda.so.1``), or without a device, makes the thread end
quietly: torch's own start reports what is wrong where the command needs the GPU.
"""

from __future__ import annotations

import ctypes
import threading

_thread: threading.Thread | None = None
_lock = threading.Lock()


def start_driver(index: int = 0) -> None:
    """Start the driver and make device ``index``'s primary context on a thread, once per
    process; returns at once."""
    global _thread
    with _lock:  # started under the lock: whoever sees the thread may join it
        if _thread is not None:
            return
        _thread = threading.Thread(target=_start, args=(index,), name="sdterm-cuda-driver", daemon=True)
        _thread.start()


def wait_driver() -> None:
    """Wait for :func:`start_driver`'s thread, if one was started (joining releases the GIL; a
    torch call into the driver while it still starts would hold the GIL while it waits)."""
    with _lock:
        thread = _thread
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def _start(index: int) -> None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return
        device = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
            return
        # Retained for the process's life: the runtime retains the same context when torch
        # first uses the device (a count; the context is made once, here).
        context = ctypes.c_void_p()
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)
    except (OSError, AttributeError):  # no driver library, or one without these entry points
        pass


__all__ = ["start_driver", "wait_driver"]
