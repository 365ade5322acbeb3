"""One call into the CUDA runtime that torch does not offer: an asynchronous host-to-device copy
from page-locked memory torch does not know as pinned.

The models' host buffers are page-locked with ``cudaHostRegister`` at their exact size
(``host_memory``), which torch 2.11's ``is_pinned`` does not see; eager copies from them are
asynchronous all the same, but during a CUDA graph capture torch refuses any copy from a CPU
tensor it thinks unpinned. The streamed U-Net's captured pass copies from those buffers, so the
copy goes straight to ``cudaMemcpyAsync`` of the runtime torch itself loaded (the same library,
found among the process's mapped files: the same current device and context).
"""

from __future__ import annotations

import ctypes
import functools

import torch

HOST_TO_DEVICE = 1
"""``cudaMemcpyHostToDevice``."""


@functools.cache
def _runtime():
    """The CUDA runtime library this process has loaded (torch's), or None (none mapped: a
    statically linked runtime, or no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libcudart.so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            lib.cudaMemcpyAsync.restype = ctypes.c_int
            lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                            ctypes.c_void_p]
            lib.cudaGetLastError.restype = ctypes.c_int
            return lib
    except (OSError, AttributeError):
        pass
    return None


def copy_to_device(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Copy ``src`` (contiguous, page-locked host bytes) into ``dst`` (contiguous device bytes of
    the same size) on ``stream``, without blocking. Raises RuntimeError where the runtime cannot
    be reached or refuses (a capture then fails and its forward runs eagerly)."""
    nbytes = src.numel() * src.element_size()
    if dst.numel() * dst.element_size() != nbytes or not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("copy_to_device: contiguous tensors of the same size only")
    lib = _runtime()
    if lib is None:
        raise RuntimeError("the CUDA runtime library is not among this process's mapped files")
    code = lib.cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), nbytes, HOST_TO_DEVICE, stream.cuda_stream)
    if code != 0:
        lib.cudaGetLastError()  # not left behind for torch's next launch check to report
        raise RuntimeError(f"cudaMemcpyAsync failed with CUDA error {code}")


def clear_error() -> None:
    """Reset the runtime's last error (after a failed capture): torch checks it after every kernel
    launch, so an error left there would surface at some later, unrelated call."""
    lib = _runtime()
    if lib is not None:
        lib.cudaGetLastError()


__all__ = ["clear_error", "copy_to_device"]
