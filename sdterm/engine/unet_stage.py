"""The engine's U-Net stage: one sampler run under the plan (resident, staged or streamed through
the ring), resumable after an out-of-memory retry. A part of :class:`sdterm.engine.pipeline.Engine`
(a mixin: it uses the engine's models, placement and LoRA state)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import torch

from ..params import Params
from ..samplers import resolve_schedule
from .attention_warm import warm_attention
from .events import Emit, StepDone
from .fork import snapshot
from .lora.state import RenderLoras
from .memory.graphs import UNetGraphs
from .memory.meter import StageMeter, memory_sample
from .memory.planner import BudgetTooSmall, MiB, Plan
from .memory.streaming import RingStreamer, ring_size
from .model_warm import stand_in, warm_inputs, warm_unet, warm_vae
from .prompt.conditioning import CHUNK_LENGTH, Conditioning
from .sampling import SamplingContext, get_sampler
from .sampling.guidance import ScheduledGuidance, runs_apart, unet_calls, unet_passes
from .sampling.schedules import sampler_plan


def built_meanwhile(build: Callable[[], object], meanwhile: Callable[[], None]) -> None:
    """Run ``build`` on a thread while this thread runs ``meanwhile``; then re-raise what
    ``build`` raised, if anything. When ``meanwhile`` fails, the build is waited for before its
    error goes on (a retry must not build the same model beside it); an interrupt (Ctrl+C, in
    ``meanwhile`` or while waiting) goes on at once, the daemon thread left to end with the process."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            build()
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="sdterm-build", daemon=True)
    thread.start()
    try:
        meanwhile()
    except Exception:
        thread.join()
        raise
    thread.join()
    if failed:
        raise failed[0]


def _quietly(fn: Callable[[], object]) -> None:
    """``fn()``, its error dropped: a head start's side job whose caller repeats it and reports."""
    try:
        fn()
    except Exception:  # noqa: BLE001 - the render's own call raises it
        pass


GRAPH_MARGIN = 32 * MiB
"""Kept free beside the weights and a graph's pool: the sampler's latents and the step's small tensors."""


class UNetStage:
    unet_graphs: UNetGraphs
    """The U-Net's CUDA graphs (the engine makes them); used where ``cuda_graphs`` is on."""
    cuda_graphs: bool

    def _graphs_on(self, plan: Plan) -> bool:
        return self.cuda_graphs and self.device.type == "cuda" and plan.unet != "host"

    def _graphed(self, unet, plan: Plan, ring: list[torch.Tensor]):
        """The forward the stage calls: graphed (a U-Net on a GPU), else ``unet``.

        A streamed U-Net is graphed one pass at a time: each call streams its units through the
        stage's ``ring`` from scratch (a streamer per pass, the copies on the side stream inside
        the capture), so every replay repeats one schedule at the same addresses, and neither the
        CPU's launches nor its streaming bookkeeping stand between the copies and the compute.
        ``ring`` holds that buffer (the stage empties it before its memory goes back)."""
        if not self._graphs_on(plan):
            self.unet_graphs.clear()
            return unet
        units = self.placement.models["unet"]
        # Where each unit's bytes are read from: its device buffer, or (streamed) its host buffer.
        weights = tuple((u.device_buf if u.device_buf is not None else u.host).data_ptr() for u in units)
        forward = unet
        if plan.unet == "streamed":
            weights += (ring[0].data_ptr(),)

            def forward(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
                with self._streamer(unet, plan, 1, ring[0]):
                    return unet(x, t, context)
        # The pool replaces the eager activations the planner counted (within its margin): what
        # must fit is this engine's weights on the device (and the ring), the pool and the step's
        # small tensors.
        held = self.placement.held_bytes() + sum(r.numel() for r in ring)
        room = None if plan.budget is None else plan.budget - held - GRAPH_MARGIN
        return self.unet_graphs.bind(forward, weights, room)

    def _acquire_unet(self, req: Params, cond: Conditioning, uncond: Conditioning, plan: Plan, split: bool,
                      x_t: torch.Tensor):
        """``_acquire("unet")``. On a GPU, when the U-Net is still to be built (the render's first
        with this model), it is built on a thread while this thread, which will run it, makes the
        first calls the render will need (their plans are kept per thread):

        - converted from the checkpoint or made at random, with the plan placing it whole: the
          U-Net's whole first call and the VAE decoder's, on stand-ins (model_warm.py), the U-Net's
          through the graphs so that its first real call captures. While the conversion still runs
          (seconds: a first use whose prompt the cache holds reaches this stage at once) all of it
          is off the render's path; where the first pass has finished already it costs what the
          real first calls would (H100: the same first-use walls within noise);
        - read from the model cache, or streamed: cuDNN's attention plans alone (attention_warm.py).
          The read takes about as long as they do (0.42-0.52 s against 0.43-0.46 s on an H100),
          so a longer warm-up would only move the rest of the first calls' work before the
          render's, not take it off its path (measured: the same U-Net + VAE seconds either way).
          Where a caller gives the render thread a head start (``warm_for``), the rest of them is
          made there, on the real models, before the render."""
        if self.device.type != "cuda" or plan.unet == "host" or self.models.built("unet"):
            return self._acquire("unet", plan.unet)
        whole = plan.unet != "streamed" and not self.models.from_cache("unet")
        built_meanwhile(lambda: self.models.module("unet"), lambda: self._first_calls(
            req.cfg, split, cond.segments[0], uncond.segments[0], x_t, plan, whole))
        return self._acquire("unet", plan.unet)

    def _first_calls(self, scale: float, split: bool, cond: torch.Tensor, uncond: torch.Tensor,
                     latent: torch.Tensor, plan: Plan, whole: bool) -> None:
        """This thread's first calls for a render's U-Net calls (see ``_acquire_unet``): ``whole``,
        the U-Net's and (unless built or off the device) the VAE decoder's whole first calls on
        stand-ins; else cuDNN's attention plans alone. ``cond``/``uncond``: (1, tokens, dim) of
        the render's dtype; ``latent``: (1, c, h, w) as the sampler starts it."""
        if not whole:
            return self._attention_plans(scale, split, cond.shape[1], uncond.shape[1], latent)
        try:
            cfg = self.models.cfg
            inputs = warm_inputs(cfg, scale, split, cond, uncond, latent, self.device)
            graphs = self.unet_graphs if self._graphs_on(plan) else None
            warm_unet(stand_in("unet", cfg, self.dtype, self.device), graphs, inputs)
            if plan.vae != "host" and not self.models.built("vae"):
                warm_vae(stand_in("vae", cfg, self.dtype, self.device), latent, plan.vae_tile)
        except RuntimeError:  # out of memory, say: only a head start, the render makes what it lacks
            pass

    def _attention_plans(self, scale: float, split: bool, cond_tokens: int, uncond_tokens: int,
                         latent: torch.Tensor) -> None:
        """cuDNN's attention plans, on this thread, for a render's U-Net calls at ``latent``'s size."""
        try:
            calls = unet_calls(scale, split, cond_tokens, uncond_tokens)
            warm_attention(self.models.cfg.unet, calls, *latent.shape[-2:], self.dtype, self.device)
        except RuntimeError:  # out of memory, say: only a head start
            pass

    def warm_for(self, req: Params) -> None:
        """Before a render of ``req`` is asked for, on the thread that will run it
        (render_thread.py), while the caller still prepares: the render's first calls, made
        ahead for a prompt and negative of one chunk each (other lengths make theirs in the
        render). On the CPU, or with the U-Net built, nothing.

        Where the U-Net will be read from the model cache, its read starts on a thread (the VAE
        decoder's too), the planner's model sizes are made on another, and this thread builds
        cuDNN's attention plans meanwhile (the longest of the three; on an H100 the two side jobs
        took 0.22 s off the command after torch's import, 8 alternating runs each). Then, where
        the render's likely plan (the text encoder counted in; the engine's forced plan where it
        has one) keeps the U-Net resident, it is uploaded and its graph
        captured there (an eager call, then the capture: the render's first call replays it), and
        the VAE decoder is uploaded and called on zeros where it stays resident too. A conversion
        (a first use) runs in the render instead, which makes the first calls on stand-ins
        meanwhile (``_acquire_unet``); a U-Net not kept resident gets the attention plans alone.
        (Leaving a conversion's attention plans to the render too was slower: 329cdde, reverted.)"""
        if self.device.type != "cuda" or self.models.built("unet"):
            return
        cached = self.models.from_cache("unet")
        if cached:
            self.models.prefetch("unet")
            if self.models.from_cache("vae"):
                self.models.prefetch("vae")
            # The plan's model sizes (meta-device models, 0.1 s) beside the attention's plans, not
            # after them; not a daemon: it may be inside torch when the command ends early.
            threading.Thread(target=_quietly, args=(self.models.sizes,), name="sdterm-sizes").start()
        cfg = self.models.cfg
        tokens = CHUNK_LENGTH + 2  # one chunk: its 75 tokens between the start and end tokens
        text = torch.zeros(1, tokens, cfg.unet.context_dim, dtype=self.dtype)
        latent = torch.zeros(1, cfg.vae.z_channels, req.height // 8, req.width // 8)
        self._attention_plans(req.cfg, False, tokens, tokens, latent)
        try:
            plan = (self.forced_plan or self.plan(req)) if cached else None
        except BudgetTooSmall:  # the render says so
            plan = None
        if plan is not None and plan.unet == "resident":
            try:
                # The render's first two calls of each signature, on its weights where they will stay:
                # the eager warm-up, then the capture; the render's first call replays.
                forward = self._graphed(self._acquire("unet", "resident"), plan, [])
                with torch.inference_mode():
                    for x, t, context in warm_inputs(cfg, req.cfg, plan.split_cfg, text, text, latent, self.device):
                        for _ in range(2 if self._graphs_on(plan) else 1):
                            forward(x, t, context)
                # Kept only where their pool fits beside the whole render, as after a render (the
                # text stage's included); else the render's first call captures again, at once.
                self._end_graphs(plan, failed=False)
                if plan.vae == "resident":
                    warm_vae(self._acquire("vae", "resident"), latent, plan.vae_tile)
            except RuntimeError:  # out of memory, say (another program took the room): the render plans again
                self.unet_graphs.clear()  # their pool too (they would read the offloaded weights anyway)
                for stage in ("unet", "vae"):
                    self.placement.offload(stage)
        # The render plans next from the device's free memory: the blocks the calls left in torch's
        # cache would count as taken (a smaller budget on a small card).
        torch.cuda.empty_cache()

    def _streamer(self, unet, plan: Plan, passes: int, ring: torch.Tensor | None = None) -> RingStreamer:
        """The streamed U-Net's units through a ring for ``passes`` U-Net calls (the caller's
        ``ring``, or one of its own)."""
        modules = [m for _, m, _ in unet.units()]
        return RingStreamer(self.placement, "unet", modules, plan.resident_units, plan.ring_bytes, passes, ring)

    def _end_graphs(self, plan: Plan, failed: bool) -> None:
        """Keep the graphs for the next render only where the U-Net stays on the device and the
        budget leaves their pool room beside the rest of the render (the VAE's decode)."""
        graphs = self.unet_graphs
        if not graphs.graphs:
            return
        keep = not failed and plan.unet == "resident" and (
            plan.budget is None or plan.estimate + graphs.held <= plan.budget)
        if not keep:
            graphs.clear()

    def _unet_stage(self, req: Params, cond: Conditioning, uncond: Conditioning, plan: Plan, progress: dict,
                    emit: Emit, check, loras: RenderLoras):
        self.merge_loras("unet", loras)
        x_t, rng, carry = progress["x"], progress["rng"], progress["carry"]
        rng.set_state(progress["rng_state"])  # a retry draws the noise a first try would have
        sampler = get_sampler(req.sampler)
        schedule = resolve_schedule(req.sampler, req.schedule)
        total, calls = sampler_plan(sampler.info, schedule, req.steps, carry.get("step", 0), progress["t_enc"])
        stage = progress.get("stage", "unet")  # "hires": the hires fix's second pass
        meter = StageMeter(stage, self.device, emit)
        # Every segment of a role has the same token count: whether cond and uncond run apart
        # is the same for the whole render.
        split = runs_apart(cond.segments[0], uncond.segments[0], plan.split_cfg)
        unet = self._acquire_unet(req, cond, uncond, plan, split, x_t)
        failed = True
        with contextlib.ExitStack() as stack:
            stack.callback(self._release, "unet", plan.unet)
            stack.callback(lambda: self._end_graphs(plan, failed))
            ring: list[torch.Tensor] = []
            if plan.unet == "streamed" and self._graphs_on(plan):
                # One ring for the stage, streamed through pass by pass (see _graphed).
                self.placement.upload("unet", units=list(plan.resident_units))
                size = ring_size(self.placement, "unet", plan.resident_units, plan.ring_bytes)
                ring.append(torch.empty(size, dtype=torch.uint8, device=self.device))
                stack.callback(ring.clear)  # freed before the release empties the cache
            elif plan.unet == "streamed":
                # Exactly the passes the rest of the render makes: nothing is prefetched past them.
                stack.enter_context(self._streamer(unet, plan, calls * unet_passes(req.cfg, split=split)))
            if plan.prefetch_vae and plan.vae != "host":
                self._acquire_prefetch("vae")
            meter.loaded()
            if "x" in carry:
                carry["x"] = carry["x"].to(self.device)
            t0 = time.perf_counter()

            # The denoiser counts its calls (the prompt schedule follows them); a retry resumes the count.
            previewer, trail = progress.get("preview"), progress.get("trail")
            denoiser = ScheduledGuidance(self._graphed(unet, plan, ring), cond.to(self.device).at, uncond.to(self.device).at, req.cfg,
                                         split=split, calls=progress["calls"], keep_last=previewer is not None)

            def on_step(i: int, t: float, x_now: torch.Tensor) -> None:
                progress["rng_state"] = rng.get_state()
                progress["calls"] = denoiser.calls
                if trail is not None:
                    del trail[carry["step"] - 1:]  # a retried step replaces what its first try kept
                    trail.append(snapshot(carry, progress["rng_state"], denoiser.calls))
                check()
                emit(StepDone(i + 1, total, t, time.perf_counter() - t0))
                emit(memory_sample(stage, self.device))
                if previewer is not None:
                    previewer.offer(i + 1, total, denoiser.last)

            def noise() -> torch.Tensor:
                z = rng.next()
                if z.device.type == "cpu" and self.device.type == "cuda":
                    # Through pinned memory and without blocking: a pageable copy would hold the
                    # host until the GPU is done, so the next step's launches (and the streamer's
                    # prefetch) could not run ahead of it.
                    return z.pin_memory().to(self.device, non_blocking=True)
                return z.to(self.device)

            ctx = SamplingContext(
                eps=denoiser,
                model=self.models.cfg.schedule, steps=req.steps, schedule=schedule,
                eta=req.eta, eta_ancestral=req.eta_ancestral, noise=noise, brownian=rng.brownian, on_step=on_step,
                carry=carry,
                info=sampler.info, init=progress["init"], t_enc=progress["t_enc"] or 0)
            with torch.inference_mode():
                latents = sampler.run(ctx, x_t.to(self.device))
            failed = False
        note = plan.describe(self.models.sizes()) if plan.unet != "host" else "cpu"
        return latents, meter.finish(note=note)
