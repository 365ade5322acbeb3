"""Live previews: the clean latent the sampler predicts at a step, as a small RGB picture.

Every sampler reaches the model through the guided denoiser, which sees the DDPM latent
x_t = sqrt(a) x0 + sqrt(1 - a) eps at a (possibly fractional) timestep t; from its last call the
predicted clean latent is x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), with a = 1 / (1 + sigma(t)^2)
from the model's own discrete sigmas (for the k-diffusion samplers this is exactly the
``denoised`` they step with). So one hook serves DDIM, PLMS, UniPC, LCM and the k-diffusion family.

x0 becomes RGB by a 4x3 linear map, latent-sized (a 512x512 render gives a 64x64 picture). The
coefficients are the ones published for SD v1 by Keturn on the Hugging Face forum ("Decoding latents
to RGB without upscaling", 2022) and used as AUTOMATIC1111's "Approx cheap" preview
(``sd_vae_approx.cheap_approximation``): rgb = x0 . M, then (rgb + 1) / 2 clamped to [0, 1], 8-bit
by truncation as A1111. They were fitted on the real SD v1 VAE; sdterm cannot fit its own here
(no real weights on the build machines), so it takes them as published.

The picture is made on the device, copied without blocking into pinned memory behind a CUDA event,
and finished (event wait, PIL image, ``emit``) on a small thread of its own: the render thread never
waits for the GPU to make a preview. Frames are throttled (``interval`` seconds apart; the last
step always) and, when the thread is still busy with the previous frame, the newer one replaces
the one waiting.
"""

from __future__ import annotations

import threading
import time
import torch
from PIL import Image

from .events import Emit, Preview

LATENT_RGB = ((0.298, 0.207, 0.208),
              (0.187, 0.286, 0.173),
              (-0.158, 0.189, 0.264),
              (-0.184, -0.271, -0.473))
"""Rows: the four SD v1 latent channels; columns: their R, G, B weights (see the module doc)."""


_MAPS: dict[torch.device, torch.Tensor] = {}


def _map_on(device: torch.device) -> torch.Tensor:
    """The 4x3 map on ``device``, uploaded once: ``torch.tensor(..., device="cuda")`` from Python
    data is a pageable copy that waits for the whole stream, which at every step would keep the
    host from running ahead of the GPU (the streamed plan's prefetch lives on that)."""
    m = _MAPS.get(device)
    if m is None:
        m = _MAPS[device] = torch.tensor(LATENT_RGB, dtype=torch.float32).to(device)
    return m


def latent_rgb(x0: torch.Tensor) -> torch.Tensor:
    """(1, 4, h, w) clean latent -> (h, w, 3) uint8 on the latent's device."""
    m = _map_on(x0.device)
    rgb = torch.einsum("lhw,lr->hwr", x0[0].float(), m)
    return (((rgb + 1) / 2).clamp(0, 1) * 255).to(torch.uint8)  # truncation, as A1111


def taesd_rgb(decoder, x0: torch.Tensor) -> torch.Tensor:
    """(1, 4, h, w) clean latent -> (8h, 8w, 3) uint8 through TAESD's decoder (its output is
    about [0, 1]), on the decoder's device and in its dtype."""
    weight = next(decoder.parameters())
    image = decoder(x0.to(weight.dtype))[0].float()
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def predicted_x0(x: torch.Tensor, t: float, eps: torch.Tensor, sigmas) -> torch.Tensor:
    """The clean latent the denoiser's call at ``t`` predicts (``sigmas``: the model's
    :class:`~.sampling.kdiffusion.DiscreteSigmas`); batch 1, fp32."""
    sigma = float(sigmas.t_to_sigma(torch.tensor(t)))
    a = 1.0 / (1.0 + sigma * sigma)
    return (x[:1].float() - (1 - a) ** 0.5 * eps[:1].float()) / a**0.5


TAESD_EVERY = 8
"""A TAESD frame every this many frames sent (and at the last step): with a frame a step, 3 decodes
in a 20-step render (H200, 512x512, resident: a TAESD frame every 4th step cost 13% of the render
in one bench run, within that card's noise of +-15%)."""
SLOTS = 3
"""Pinned host buffers a render's previews cycle through on CUDA."""


class _Slot:
    """A pinned host buffer for one frame and the event its copy completes at."""

    def __init__(self, shape: tuple[int, int]):
        self.host = torch.empty((*shape, 3), dtype=torch.uint8, pin_memory=True)
        self.done = torch.cuda.Event()
        self.busy = False
        """Handed to the preview thread (or waiting for it); it clears this when done."""

    def free(self, shape) -> bool:
        return not self.busy and tuple(self.host.shape) == tuple(shape)


class Previewer:
    """One render's preview frames: :meth:`offer` after each step, :meth:`close` at the end."""

    def __init__(self, emit: Emit, interval: float, sigmas, stage: str = "unet", device: torch.device | None = None,
                 shape: tuple[int, int] | None = None, taesd=None, every: int = TAESD_EVERY):
        self.emit, self.interval, self.sigmas, self.stage = emit, interval, sigmas, stage
        self.taesd, self.every = taesd, every
        """TAESD's decoder on the device (None: the linear map only), for every ``every``-th frame
        sent and the last one; the other frames are the linear map's."""
        self._slots: list[_Slot] = []
        if device is not None and device.type == "cuda":
            _map_on(device)  # uploaded before the sampler starts, not in its first step
            if shape is not None:  # pinned buffers made now: a pinned allocation mid-render stalls the host
                self._slots = [_Slot(shape) for _ in range(SLOTS)]
                if taesd is not None:
                    self._slots += [_Slot((shape[0] * 8, shape[1] * 8)) for _ in range(2)]
        self.last_sent = float("-inf")
        self.frames = 0
        """Frames handed on (throttled ones not counted)."""
        self._pending: tuple | None = None
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def offer(self, step: int, total: int, last: tuple[torch.Tensor, float, torch.Tensor] | None) -> None:
        """After step ``step`` (1-based) of ``total``: a frame from the denoiser's last call, unless
        one went out less than ``interval`` ago (the last step always makes one)."""
        now = time.monotonic()
        if last is None or (step < total and now - self.last_sent < self.interval):
            return
        self.last_sent = now
        x, t, eps = last
        # Every ``every``-th frame sent (and the last) through TAESD: throttled frames don't count.
        decode = self.taesd is not None and ((self.frames + 1) % self.every == 0 or step == total)
        with torch.inference_mode():
            x0 = predicted_x0(x, t, eps, self.sigmas)
            rgb = taesd_rgb(self.taesd, x0) if decode else latent_rgb(x0)
        scale = 1 if decode else 8
        if rgb.device.type != "cuda":
            self.frames += 1
            self._finish(step, total, rgb, None, scale)
            return
        slot = next((b for b in self._slots if b.free(rgb.shape)), None)
        if slot is None:
            if step < total:
                return  # every buffer still on its way to the screen: this frame is skipped
            slot = _Slot(tuple(rgb.shape[:2]))  # the last frame always goes
        self.frames += 1
        slot.host.copy_(rgb, non_blocking=True)
        slot.done.record()
        slot.busy = True
        with self._cv:
            if self._pending is not None:  # a newer frame replaces one still waiting
                self._pending[2].busy = False
            self._pending = (step, total, slot, scale)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sdterm-preview", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                step, total, slot, scale = self._pending
                self._pending = None
            try:
                self._finish(step, total, slot.host, slot.done, scale)
            finally:
                slot.busy = False

    def _finish(self, step: int, total: int, rgb: torch.Tensor, done, scale: int) -> None:
        if done is not None:
            done.synchronize()
        self.emit(Preview(self.stage, step, total, Image.fromarray(rgb.cpu().numpy(), "RGB"), scale))

    def close(self) -> None:
        """Send what is waiting, then stop the thread (the render's frames all arrive before its result)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()


class TaesdSource:
    """A TAESD decoder file (``sdterm download taesd``), read on first use and kept on the host;
    each pass that has room for it gets a device copy for its previews."""

    def __init__(self, path):
        self.path = path
        self._module = None
        self.failed: str | None = None
        """Why the file can't be used (said once; previews then use the linear map)."""

    def for_pass(self, device: torch.device, dtype: torch.dtype, budget: int | None, estimate: int, width: int,
                 height: int, notice) -> torch.nn.Module | None:
        """TAESD's decoder on ``device`` for a pass of ``width`` x ``height``, or None: on the CPU
        (too slow there), without a budget to check against, or when the plan's estimated peak
        leaves less room than the decoder needs (its weights and activations,
        :func:`~.networks.taesd.taesd_bytes`): previews never raise the peak above the budget."""
        from .networks.taesd import TAESDError, load_taesd, taesd_bytes

        if device.type != "cuda" or budget is None or self.failed is not None:
            return None
        itemsize = dtype.itemsize
        if budget - estimate < taesd_bytes(width, height, itemsize):
            return None
        if self._module is None:
            try:
                self._module = load_taesd(self.path)
            except TAESDError as exc:
                self.failed = str(exc)
                notice(f"TAESD previews off: {exc}", "warning")
                return None
        import copy

        return copy.deepcopy(self._module).to(device, dtype)
