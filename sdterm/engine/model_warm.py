"""A process's first U-Net and VAE calls, made on the render thread before the render needs them:
on stand-ins while the U-Net's weights are still being converted, or on the real models once read
(``Engine.warm_for``, a one-shot command's head start).

A model's first call in a process costs far more than its next: cuDNN builds an execution plan for
every convolution and attention shape it meets (kept in a cache of the calling thread), cuBLAS
makes its handle and picks its kernels, CUDA loads each kernel at its first launch, and the U-Net's
CUDA graph (memory/graphs.py) needs one eager call at a signature before it captures. On an H100
a first repeated ``sdterm generate`` spent 0.76-1.04 s in its U-Net stage against 0.17 s steady,
and 0.10-0.19 s decoding against 0.015 s (2026-11-27). A thread's own share (its plans) of a U-Net
call at 512x512 was 0.5 s there, 0.4 s of it cuDNN's attention plans (2026-11-27).

None of that depends on the weights' values, only on the shapes, dtypes, strides and alignment of
the tensors. So while another thread converts the U-Net from the checkpoint (unet_stage.py says
when this pays, and when the attention's plans alone are warmed instead), the render thread runs a
stand-in: the same model on the device with uninitialised weights laid out exactly as the
placement lays out the real ones (:func:`stand_in`), called with the render's inputs
(:func:`warm_inputs`). The U-Net's call goes through :meth:`UNetGraphs.rehearse`, so the render's
first real call captures its graph at once. Nothing the stand-in computes is kept.

Every unit of a stand-in is a view of one buffer the size of its largest unit (94 MiB for SD v1's
U-Net in fp16, against 1.6 GiB for the whole): a unit's tensors sit where they sit in the real
unit, and every unit starts where an allocation starts, as the real units do, so each tensor has
the alignment and strides of the real one. The weights are only read, and their values do not
matter. A stand-in's call takes that buffer and one call's activations, within what the stage
itself will take: the engine warms a model whose stage places it whole (resident or staged), not
a streamed U-Net (attention_warm.py warms that one's attention alone). The VAE decoder (one unit)
is warmed after the U-Net's stand-in is freed, within what its own stage takes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .loading.host_units import meta_model, stage_layout
from .memory.graphs import UNetGraphs
from .memory.tiling import decode_latents
from .result import to_image
from .sampling.guidance import unet_calls

WARM_TIMESTEP = 500.0


def stand_in(stage: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The stage's model on ``device`` with uninitialised weights, in the layout the model cache
    and the placement's units give the real one (dtypes, strides, channels-last convolutions,
    alignment): what a first call's plans are keyed by. Its units share one buffer, the size of
    the largest."""
    layout = stage_layout(stage, meta_model(stage, cfg), dtype)
    layout.bind_shared(torch.empty(max(n for _, n in layout.units), dtype=torch.uint8, device=device))
    return layout.model.eval()


def warm_inputs(cfg: ModelConfig, scale: float, apart: bool, cond: torch.Tensor, uncond: torch.Tensor,
                latent: torch.Tensor, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (x, t, context) of each distinct U-Net call a render makes (zeros): guidance at
    ``scale`` with the text ``cond`` and ``uncond`` (1, tokens, dim), run ``apart`` or in one
    batch (sampling/guidance.py's ``unet_calls``), on the render's ``latent`` (1, c, h, w); a
    float32 timestep per batch item."""
    _, c, h, w = latent.shape
    calls = unet_calls(scale, apart, cond.shape[1], uncond.shape[1])
    return [(torch.zeros(batch, c, h, w, dtype=latent.dtype, device=device),
             torch.full((batch,), WARM_TIMESTEP, dtype=torch.float32, device=device),
             torch.zeros(batch, tokens, cfg.unet.context_dim, dtype=cond.dtype, device=device))
            for batch, tokens in calls]


def warm_unet(unet: nn.Module, graphs: UNetGraphs | None,
              inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """One call of ``unet`` (a stand-in, or the real one) on each of ``inputs``
    (:func:`warm_inputs`): through ``graphs`` (the render's first real call then captures), or
    eagerly where there are none."""
    with torch.inference_mode():
        for x, t, context in inputs:
            if graphs is not None:
                graphs.rehearse(unet, x, t, context)
            else:
                unet(x, t, context)


def warm_vae(vae: nn.Module, latent: torch.Tensor, tile: int | None) -> None:
    """One decode of the render's latent shape by ``vae`` (a decoder stand-in, or the real one),
    tiled as the plan tiles, and what the VAE stage does with a decode after it (the overflow
    check, the 8-bit image)."""
    device = next(vae.parameters()).device
    with torch.inference_mode():
        decoded = decode_latents(vae, torch.zeros(latent.shape, dtype=latent.dtype, device=device), tile)
        bool(torch.isfinite(decoded).all())
        to_image(decoded.nan_to_num())


__all__ = ["stand_in", "warm_inputs", "warm_unet", "warm_vae"]
