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

from .cudart import clear_error

PAGE = 4096


def _cudart():
    return torch.cuda.cudart()


_LOCKED: dict[int, int] = {}
"""Address -> bytes of every buffer :func:`lock` page-locked and not yet unlocked."""


def page_locked(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory is page-locked: torch's pinned memory, or inside a buffer
    :func:`lock` registered (torch's ``is_pinned`` does not know those on torch 2.11)."""
    if t.is_pinned():
        return True
    ptr = t.data_ptr()
    return any(base <= ptr < base + n for base, n in list(_LOCKED.items()))


def _unregister(ptr: int) -> None:
    _LOCKED.pop(ptr, None)
    try:
        _cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - at worst the pages stay locked until the process ends
        pass


_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
"""The numpy array behind each buffer :func:`aligned` made, by the buffer's address (the
finalizer that unlocks the memory must hang on the array that frees it)."""


def aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of plain host memory (a uint8 tensor), page-aligned, that :func:`lock` can
    page-lock later (after it is filled: CUDA's start-up need not wait for the reading)."""
    raw = np.empty(max(nbytes, 1) + PAGE, dtype=np.uint8)
    skip = (-raw.ctypes.data) % PAGE
    buf = torch.from_numpy(raw)[skip : skip + nbytes]
    _OWNERS[buf.data_ptr()] = raw
    return buf


def lock(buf: torch.Tensor) -> bool:
    """Page-lock ``buf`` (from :func:`aligned`) at its exact size; False where CUDA refuses (it
    stays plain memory: uploads from it then are synchronous, nothing else changes). Unlocked
    just before its memory is freed, when the last tensor viewing it is gone."""
    owner = _OWNERS.get(buf.data_ptr())
    if owner is None or buf.numel() == 0:
        return False
    ptr = buf.data_ptr()
    try:
        torch.cuda.init()
        cudart = _cudart()
        code = int(cudart.cudaHostRegister(ptr, buf.numel(), 0))
    except Exception:  # noqa: BLE001 - no CUDA runtime to ask
        return False
    if code != 0:
        clear_error()  # not left for the next kernel launch check to report
        return False
    _LOCKED[ptr] = buf.numel()
    done = weakref.finalize(owner, _unregister, ptr)
    done.atexit = False  # at exit the process's memory goes anyway; CUDA may be gone by then
    return True


def pinned_exact(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of page-locked host memory (a uint8 tensor), or None where CUDA refuses."""
    if nbytes <= 0:
        return None
    buf = aligned(nbytes)
    return buf if lock(buf) else None


def host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat host byte buffer; page-locked at its exact size when ``pin`` (the device is a GPU)."""
    if pin:
        exact = pinned_exact(nbytes)
        if exact is not None:
            return exact
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
