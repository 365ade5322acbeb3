"""CUDA's start in a process, on a thread of its own, while the command opens the model and sets
up the engine: the driver (``cuInit``), torch's initialisation, the device's context and, for a
command that is about to render, the libraries' and kernels' first calls. A command that renders
starts the driver and the context earlier still, beside torch's import (``cuda_driver.py``): this
thread then waits for that one first.

A process's first GPU render pays, on top of its compute, for everything CUDA does once per
process: starting cuBLAS and cuDNN, loading each kernel at its first launch (CUDA loads modules
lazily), building the plans of each shape. Part of that is kept per thread (cuDNN's plans, the
libraries' handles) and must happen on the thread that renders (``unet_stage`` warms the
attention's plans there while the U-Net is read). The rest is the process's: one call of each
kind of operation the models make, at small shapes, on this thread, loads the libraries and the
kernels' modules for the whole process. On an H100 (2026-11-27, repeated ``sdterm generate``, 8
alternating processes each) that took 0.86 s here and cut the render's first U-Net run from 1.02
s to 0.66 s (medians), from torch's import to the command's end 2.68 s -> 2.48 s; leaving
attention out of them took a further 0.14 s off (:func:`first_calls_of_models`).

Making them at the render's own shapes (a U-Net stand-in's whole call, its attention left out,
and a VAE decode, at 512x512) was measured and not kept: the render's first decode took 0.05 s
against 0.10 s, but this thread then ran 1.8 s beside the render's start and slowed it (torch's
import to the command's end 2.36 s against 2.22 s, 6 alternating processes each, both trees also
warming the whole U-Net on the render thread, a change not kept either: docs/benchmarks.md).

The first calls run on a stream of their own and on small tensors (a few MiB), and leave nothing
allocated (cuBLAS's workspace of this thread is dropped); the render waits for them
(:func:`wait_started`) before it captures a CUDA graph, so a capture never shares the device with
them.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .cuda_driver import wait_driver

_threads: dict[int, threading.Thread] = {}
_lock = threading.Lock()


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


def start_cuda(device: torch.device | str = "cuda", *, first_calls: bool = False) -> None:
    """Start CUDA for ``device`` on a thread, once per process: the driver, torch's initialisation
    and the device's context and, with ``first_calls`` (a command about to render), the process's
    first calls of the operations the models make (:func:`first_calls_of_models`). The caller goes
    on meanwhile; the first use of CUDA elsewhere waits for the driver and context (they are
    serialised). Sets up the allocator first (:func:`use_expandable_segments`): that must come
    before the first allocation."""
    index = _index(torch.device(device))
    with _lock:
        if index in _threads:
            return
        thread = threading.Thread(target=_start, args=(index, first_calls), name="sdterm-cuda-init", daemon=True)
        _threads[index] = thread
    use_expandable_segments()
    thread.start()


def wait_started(device: torch.device) -> None:
    """Wait until the start of ``device`` (if one was started) has finished: before a CUDA graph
    is captured, so that no other thread's work shares the device with the capture."""
    thread = _threads.get(_index(device))
    if thread is not None and thread is not threading.current_thread():
        thread.join()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else 0  # "cuda": the first device


def _start(index: int, first_calls: bool) -> None:
    try:
        wait_driver()  # started before torch's import, where the command did (cuda_driver.py)
        if not torch.cuda.is_available():  # the driver's start (cuInit), unless it ran already
            return
        torch.cuda.init()
        # torch's initialisation leaves the context to the first call that needs one: make it here,
        # not in the render's first planning on the thread that waits for it.
        torch.cuda.mem_get_info(index)
        if first_calls:
            first_calls_of_models(torch.device("cuda", index))
    except Exception:  # noqa: BLE001 - only a head start: the first real use of CUDA reports what is wrong
        pass


def first_calls_of_models(device: torch.device, dtype: torch.dtype = torch.float16) -> None:
    """One call of each kind of operation the U-Net, the VAE and the samplers make, at small
    shapes, in the models' dtype and layout (channels-last convolutions), on a stream of its own;
    nothing stays allocated. What it is for: the module's doc.

    Attention (SDPA) is left out: on an H100 cuDNN runs it, and what its first call costs is the
    plan of its shape, kept by the thread that builds it (a third thread's first U-Net call built
    them again: 0.45 s of its 0.61 s), so here it only took time beside the render's own start.
    Without it, a repeated ``generate`` went from torch's import to its end in 1.92 s against
    2.06 s (7 alternating processes each, medians, 2026-11-27), the render's first U-Net run
    unchanged (0.50 s)."""
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream), torch.inference_mode():
        last = torch.channels_last

        def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(shape, device=device, dtype=dt)

        x = zeros(2, 64, 16, 16).to(memory_format=last)
        y = F.conv2d(x, zeros(64, 64, 3, 3).to(memory_format=last), zeros(64), padding=1)
        y = F.conv2d(y, zeros(64, 64, 1, 1).to(memory_format=last), zeros(64))
        y = F.silu(F.group_norm(y, 32, zeros(64), zeros(64), 1e-5))
        y = torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest")] * 2, dim=1)
        tokens = F.layer_norm(zeros(2, 77, 64), (64,), zeros(64), zeros(64))
        h = F.linear(tokens, zeros(128, 64), zeros(128)).chunk(2, dim=-1)
        h = h[0] * F.gelu(h[1])
        t = torch.full((2,), 500.0, device=device)
        freqs = torch.exp(-torch.arange(0, 160, dtype=torch.float32, device=device) / 160)
        torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1).to(dtype)
        latent = zeros(1, 4, 8, 8, dt=torch.float32)
        (latent + 0.5 * latent / (latent * latent + 1).sqrt()).to(dtype).float().clamp(-1, 1)
        stream.synchronize()
    # cuBLAS keeps a workspace per handle and stream (8-32 MiB): this thread's would stay allocated
    # for nothing. torch drops them all at each graph capture too; a thread using its own gets a
    # new one at its next call.
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    # The blocks the allocator cached for this stream go back to the driver at the first stage's
    # end (the engine empties the cache there).


__all__ = ["first_calls_of_models", "start_cuda", "use_expandable_segments", "wait_started"]
