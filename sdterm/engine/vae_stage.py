"""The engine's VAE stages: latents to an image under the plan (resident, staged or tiled), with
the fp32 re-decode when fp16 overflows; and for img2img the init image to its latent, the encoder
placed and tiled as the plan places and tiles the decoder, with the fp32 re-encode. A part of :class:`sdterm.engine.pipeline.Engine` (a mixin:
it uses the engine's models, placement and budget)."""

from __future__ import annotations

import torch

from .events import Emit
from .memory.meter import StageMeter
from .memory.planner import MARGIN, Plan
from .memory.tiling import decode_latents, encode_latents, fp32_decode_tile
from .result import to_image


class VaeStage:
    def _vae_stage(self, latents: torch.Tensor, plan: Plan, emit: Emit, notice, convert=to_image):
        """Latents -> the image (``convert``: the decoded tensor to a PIL image)."""
        meter = StageMeter("vae", self.device, emit)
        vae = self._acquire("vae", plan.vae)
        tile, precision = plan.vae_tile, ""
        try:
            meter.loaded()
            with torch.inference_mode():
                z = latents.to(self.device)
                decoded = decode_latents(vae, z, tile)
                if not torch.isfinite(decoded).all() and decoded.dtype != torch.float32:
                    # fp16 overflow gives NaN/inf (a black image): decode again in fp32, whose
                    # activations take twice the memory, so the tile is planned again for them.
                    del decoded
                    tile = self._fp32_tile(z, plan)
                    precision = ", fp32"
                    notice("VAE output overflowed in fp16: decoded again in fp32"
                           + (f" (tiled {tile * 8}px to fit its activations)" if tile else ""), "warning")
                    decoded = decode_latents(vae.float(), z.float(), tile)
                image = convert(decoded)
        finally:
            if vae.post_quant_conv.weight.dtype != self.dtype:  # the fp32 fallback replaced the weights
                self.placement.offload("vae")  # back to the packed run-dtype host copy
                if vae.post_quant_conv.weight.dtype != self.dtype:  # a model run in place on the host
                    vae.to(self.dtype)
            self._release("vae", plan.vae)
        tiled = f", tiled {tile * 8}px" if tile else ""
        return image, meter.finish(note=f"vae {plan.vae}{tiled}{precision}")

    def _fp32_tile(self, z: torch.Tensor, plan: Plan) -> int | None:
        """The decode tile for an fp32 re-decode within the budget: fp32 weights (made beside the
        fp16 ones) and fp32 activations, in what the budget leaves. On the CPU nothing moves and
        there is no budget: the plan's tile stands."""
        budget = self.effective_budget()
        if budget is None:
            return plan.vae_tile
        available = budget - MARGIN - torch.cuda.memory_allocated(self.device) - 2 * self.models.sizes().vae
        return fp32_decode_tile(self.models.cfg.vae, z.shape[-2], z.shape[-1], plan.vae_tile, available)

    def _encode_stage(self, images: torch.Tensor, plan: Plan, emit: Emit, notice):
        """The init image (1, 3, H, W) in [-1, 1] -> its scaled latent (the posterior mean), fp32 on
        the device; the encoder lives where the plan keeps the decoder, tiled as it is tiled."""
        meter = StageMeter("vae", self.device, emit)
        encoder = self._acquire("vae_encoder", plan.vae)
        try:
            meter.loaded()
            with torch.inference_mode():
                z = encode_latents(encoder, images.to(self.device, self.dtype), plan.vae_tile,
                                   fp32_tile=lambda tile: self._fp32_tile(images[..., ::8, ::8], plan))
            if z.dtype == torch.float32 and self.dtype != torch.float32:
                notice("VAE encoder overflowed in fp16: encoded again in fp32", "warning")
        finally:
            if encoder.quant_conv.weight.dtype != self.dtype:  # the fp32 fallback replaced the weights
                self.placement.offload("vae_encoder")
                if encoder.quant_conv.weight.dtype != self.dtype:
                    encoder.to(self.dtype)
            self._release("vae_encoder", plan.vae)
        return z.float(), meter.finish(note=f"vae encoder {plan.vae}" + (f", tiled {plan.vae_tile * 8}px"
                                                                         if plan.vae_tile else ""))
