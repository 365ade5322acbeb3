"""Page-locked host memory at its exact size, for the models' host buffers.

torch's pinned allocator rounds every block up to a power of two: a 1.7 GB U-Net buffer would pin
2 GiB, all of it resident (host RSS). Here a plain allocation (numpy, page-aligned slice) is
registered with CUDA (``cudaHostRegister``) instead: exactly the bytes asked for, page-locked, so
uploads from it are asynchronous DMA like from torch's pinned blocks. It is unregistered just before
its memory is freed (numpy clears weak references before it frees an array's data), when the last
tensor viewing it is gone. Where CUDA refuses, torch's own pinned allocation is used.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

PAGE = 4096


def _cudart():
    return torch.cuda.cudart()


def _unregister(ptr: int) -> None:
    try:
        _cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at worst the pages stay locked until the process ends
        pass


def pinned_exact(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of page-locked host memory (a uint8 tensor), or None where CUDA refuses."""
    if nbytes <= 0:
        return None
    try:
        torch.cuda.init()
        cudart = _cudart()
        raw = np.empty(nbytes + PAGE, dtype=np.uint8)
        skip = (-raw.ctypes.data) % PAGE
        ptr = raw.ctypes.data + skip
        code = int(cudart.cudaHostRegister(ptr, nbytes, 0))
    except Exception:  # noqa: BLE001 - no CUDA runtime to ask: torch's pinned allocation then
        return None
    if code != 0:
        clear = getattr(cudart, "cudaGetLastError", None)
        if clear is not None:
            try:
                clear()  # not left for the next kernel launch check to report
            except Exception:  # noqa: BLE001
                pass
        return None
    done = weakref.finalize(raw, _unregister, ptr)
    done.atexit = False  # at exit the process's memory goes anyway; CUDA may be gone by then
    return torch.from_numpy(raw)[skip : skip + nbytes]


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat host byte buffer; page-locked at its exact size when ``pin`` (the device is a GPU)."""
    if pin:
        exact = pinned_exact(nbytes)
        if exact is not None:
            return exact
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
