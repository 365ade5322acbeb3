"""diffusers' placements for the bench's reference (``options.REFERENCE_MODES``): how each is set up
on a fresh pipeline (``place_pipeline``), whether this torch, diffusers and device can run it
(``mode_unavailable``), which errors end one of its rows (``mode_errors``, ``mode_error_line``),
and how it is let go (``release_mode``).

Each setup is diffusers' own documented recipe, so the rows compare sdterm with what a diffusers
user gets: ``pipe.to``, accelerate's model and sequential offload, group offloading of every model
of the pipeline with a CUDA stream (``DiffusionPipeline.enable_group_offload``, which hooks
ModelMixin models with their own ``enable_group_offload`` and the transformers text encoder with
``diffusers.hooks.apply_group_offloading``), and ``torch.compile`` of the U-Net in
"reduce-overhead" mode (CUDA graphs) after a channels-last U-Net, as in diffusers' SD compile
benchmark. torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

MODE_PLANS = {
    "gpu": "pipe.to(device)",
    "model-offload": "enable_model_cpu_offload()",
    "sequential-offload": "enable_sequential_cpu_offload()",
    "group-offload-block": "group offload, block level + stream",
    "group-offload-leaf": "group offload, leaf level + stream",
    "compile": "pipe.to(device), torch.compile(unet, reduce-overhead)",
}
"""How each of diffusers' placements is set up, shown in the plan column."""

ACCELERATE_MODES = ("model-offload", "sequential-offload")
"""Placements made by accelerate's hooks (group offloading is diffusers' own)."""

GROUP_OFFLOAD_TYPES = {"group-offload-block": "block_level", "group-offload-leaf": "leaf_level"}


def _has_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def _group_offload_unavailable() -> str | None:
    import diffusers

    try:
        from diffusers.hooks import apply_group_offloading  # noqa: F401
    except ImportError:
        found = False
    else:
        found = hasattr(diffusers.DiffusionPipeline, "enable_group_offload")
    return None if found else f"diffusers {diffusers.__version__} has no group offloading of a pipeline"


def _compile_unavailable() -> str | None:
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo
        from torch.utils._triton import has_triton
    except ImportError as exc:
        return f"torch.compile cannot be imported ({exc})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if not has_triton():
        return "torch.compile's inductor needs triton for CUDA (pip install triton)"
    return None


def mode_unavailable(mode: str, device) -> str | None:
    """Why ``mode`` cannot run on ``device`` with this torch and diffusers (a note's reason), or None.
    All but "gpu" need CUDA: the offload modes move weights to a CUDA device (group offload's
    stream is a CUDA stream), and torch.compile on the CPU is not what a GPU peer runs."""
    if mode == "gpu":
        return None
    if device.type != "cuda":
        return "it needs a CUDA device"
    if mode in ACCELERATE_MODES:
        return None if _has_accelerate() else "it needs accelerate (pip install accelerate)"
    if mode in GROUP_OFFLOAD_TYPES:
        return _group_offload_unavailable()
    if mode == "compile":
        return _compile_unavailable()
    return None


def group_offload_kwargs(mode: str, device) -> dict:
    """``enable_group_offload``'s arguments for a group-offload mode: weights on the host, moved to
    ``device`` one block (or one leaf layer) at a time on a CUDA stream, the next one prefetched
    while the current one runs (diffusers needs one block per group for that)."""
    import torch

    kwargs = dict(onload_device=device, offload_device=torch.device("cpu"), offload_type=GROUP_OFFLOAD_TYPES[mode],
                  use_stream=True)
    if mode == "group-offload-block":
        kwargs["num_blocks_per_group"] = 1
    return kwargs


def place_pipeline(pipe, mode: str, device) -> None:
    """Set up a fresh pipeline (on the host) in ``mode``."""
    if mode == "gpu":
        pipe.to(device)
    elif mode == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode in GROUP_OFFLOAD_TYPES:
        pipe.enable_group_offload(**group_offload_kwargs(mode, device))
    elif mode == "compile":
        import torch

        pipe.to(device)
        pipe.unet.to(memory_format=torch.channels_last)
        # Lazy: the first render compiles (and records the CUDA graphs); its seconds are noted on the row.
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
    else:
        raise ValueError(f"unknown reference mode {mode!r}")


def compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it fails: dynamo's errors (a graph break under fullgraph,
    a backend that failed, wrapping inductor's and triton's) and inductor's own compile errors."""
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError,
            torch._inductor.exc.LoweringException)


def mode_errors(mode: str, soft: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    """The errors that end one of ``mode``'s rows rather than the run: ``soft`` (out of memory),
    and for "compile" a failed compile, which is no out-of-memory and is caught for that mode only."""
    return soft + compile_errors() if mode == "compile" else soft


def mode_error_line(mode: str, exc: BaseException, error_line) -> str:
    """The row's error: ``error_line``'s (out of memory...), or what a failed compile says failed."""
    if mode == "compile" and isinstance(exc, compile_errors()):
        inner = getattr(exc, "inner_exception", None) or exc
        text = str(inner).strip()
        first = text.splitlines()[0] if text else ""
        return f"torch.compile failed: {type(inner).__name__}" + (f": {first}" if first else "")
    return error_line(exc)


def release_mode(pipe, mode: str) -> None:
    """Undo what ``place_pipeline`` hooked into process-wide state before the pipeline goes:
    accelerate's hooks, and for "compile" dynamo's caches and the CUDA graphs' memory pool."""
    if mode in ACCELERATE_MODES:
        pipe.remove_all_hooks()
    elif mode == "compile":
        import torch._dynamo

        torch._dynamo.reset()


__all__ = [
    "ACCELERATE_MODES",
    "GROUP_OFFLOAD_TYPES",
    "MODE_PLANS",
    "compile_errors",
    "group_offload_kwargs",
    "mode_error_line",
    "mode_errors",
    "mode_unavailable",
    "place_pipeline",
    "release_mode",
]
