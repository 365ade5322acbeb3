"""``Engine.generate(request, *, emit, cancelled)``: encode -> denoise -> decode, written once.

The engine keeps each model in host memory after its first use (``loading/models.py``); for each
render the planner decides where each model lives within the VRAM budget, and each stage runs under
that plan (resident, staged, streamed), retrying a cheaper plan on out-of-memory. Events, no prints.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Callable

import torch

from ..params import Params
from .embedding_cache import ChunkStore, EmbeddingCache
from .events import STAGE_TITLES, Emit, Notice, StepDone, ignore
from .loading.models import Models, ModelSource, open_model
from .memory.meter import StageMeter, memory_sample
from .result import Cancelled, OutOfMemory, Result, to_image
from .memory.placement import Placement, resolve_device, run_dtype
from .memory.planner import Plan, cheaper, plan_render
from .memory.streaming import RingStreamer
from .memory.tiling import choose_tile, vae_activation_bytes
from .prompt.conditioning import (Chunk, Conditioning, RolePrompt, cache_status, empty_chunk, encode_chunk,
                                  needed_chunks, prepare_prompts, schedule_steps)
from .prompt.embedding_db import EmbeddingFolders
from .prompt.report import infotext_extra, prompt_summary
from .lora.state import LoraState, RenderLoras
from ..samplers import resolve_schedule
from .sampling import SamplingContext, get_sampler
from .sampling.schedules import sampler_plan
from .sampling.guidance import ScheduledGuidance, runs_apart, unet_passes
from .sampling.rng import ImageRNG
from .sampling.img2img import t_enc
from .init_image import prepare as prepare_init_image
from .vae_stage import VaeStage

DEFAULT_BUDGET_MARGIN = 512 * 2**20
"""Without --vram-budget, leave this much of the device's free memory to others."""


class Engine(VaeStage):
    """The models of one checkpoint, rendering requests on one device within a VRAM budget."""

    def __init__(
        self,
        source: ModelSource,
        device: str = "auto",
        *,
        data_dir: Path | None = None,
        hash_memo: Path | None = None,
        tokenizer_dir: Path | None = None,
        cache: EmbeddingCache | None = None,
        random_seed: int = 0,
        budget: int | None = None,
        plan: Plan | None = None,
        embedding_dirs: list[Path] | None = None,
        optional_embedding_dirs: list[Path] | None = None,
        lora_dirs: list[Path] | None = None,
        optional_lora_dirs: list[Path] | None = None,
        vae: Path | None = None,
    ):
        self.device = resolve_device(device)
        self.models = Models(
            source,
            run_dtype(self.device),
            data_dir=data_dir,
            hash_memo=hash_memo,
            tokenizer_dir=tokenizer_dir,
            random_seed=random_seed,
            vae=vae,
        )
        self.budget = budget
        """VRAM budget in bytes; None: the device's free memory minus a margin (no planning on CPU)."""
        self.forced_plan = plan
        """A fixed plan instead of the planner's choice (tests, experiments)."""
        self.cache = cache
        self.placement = Placement(self.device)
        self.loras = LoraState(self.models.cfg, lora_dirs or [], optional_lora_dirs or [])
        """LoRA folders (``optional``: may be missing without a word) and what is merged now."""
        self.embeddings = EmbeddingFolders(embedding_dirs or [], self.models.cfg.text.hidden_size,
                                           optional=optional_embedding_dirs or [])
        """Folders of textual-inversion embeddings, searched in order, rescanned at each render
        (``optional``: those that may be missing without a word, the default one)."""

    @property
    def source(self) -> ModelSource:
        return self.models.source

    @property
    def dtype(self) -> torch.dtype:
        """The run dtype (fp16 on CUDA, fp32 on the CPU): the models' dtype."""
        return self.models.dtype

    # ---- planning ----------------------------------------------------------------------------

    def set_budget(self, budget: int | None) -> None:
        """Change the VRAM budget (None: the device's free memory minus a margin). Models leave
        the device; the next render plans and uploads again."""
        self.budget = budget
        self.placement.offload_all()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_vae(self, path: Path | None) -> None:
        """Decode with the VAE file ``path`` (None: the checkpoint's own). Verified first
        (CheckpointError, one line, nothing changes); only the decoder is rebuilt and re-placed."""
        self.models.set_vae(path)
        self.placement.forget("vae")

    def effective_budget(self) -> int | None:
        """The VRAM budget in force; None on the CPU, where nothing moves."""
        if self.device.type != "cuda":
            return None
        if self.budget is not None:
            return self.budget
        free, _total = torch.cuda.mem_get_info(self.device)
        held = sum(self.placement.device_bytes(n) for n in self.placement.models)
        return free + held - DEFAULT_BUDGET_MARGIN

    def plan(self, req: Params, text_needed: bool = True) -> Plan:
        budget = self.effective_budget()
        if budget is None:
            return Plan(None, text="host", unet="host", vae="host")
        lat_h, lat_w = req.height // 8, req.width // 8
        return plan_render(
            self.models.sizes(),
            budget,
            req.width,
            req.height,
            vae_decode_bytes=lambda: vae_activation_bytes(self.models.cfg.vae, lat_h, lat_w, self.dtype),
            vae_tile_for=lambda avail: choose_tile(self.models.cfg.vae, lat_h, lat_w, self.dtype, avail),
            cfg_batch=1 if req.cfg == 1.0 else 2,
            text_needed=text_needed,
        )

    # ---- the prompt, before rendering ---------------------------------------------------------

    def explain(self, text: str, steps: int = 20, sampler: str = "DDIM"):
        """How ``text`` is tokenized, chunked, weighted and where its embeddings are
        (``PromptReport``), for a display beside the prompt box: no model is built; the first
        call may import transformers to tokenize (seconds), so call it off the UI thread."""
        from .prompt.report import explain

        db = self.embeddings.index(self.models.tokenizer.ids)
        second = get_sampler(sampler).info.second_order if sampler else False
        return explain(text, self.models.tokenizer, schedule_steps(steps, second), embeddings=db)

    # ---- rendering ---------------------------------------------------------------------------

    def generate(
        self,
        request: Params,
        *,
        emit: Emit = ignore,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Result:
        req = request.validated()
        started = time.perf_counter()
        notices: list[str] = []

        def notice(message: str, level: str = "info") -> None:
            if message in notices:  # once per render, however many retries repeat it
                return
            notices.append(message)
            emit(Notice(message, level))

        def check() -> None:
            if cancelled():
                raise Cancelled()

        tokenizer = self.models.tokenizer
        sampler = get_sampler(req.sampler)
        prompt, loras = self.loras.resolve(req.prompt, notice)  # <lora:...> tags out of what CLIP sees
        pos, neg, clip_skip = prepare_prompts(req.replace(prompt=prompt), tokenizer, self.models.cfg.text.num_layers, notice,
                                              steps=schedule_steps(req.steps, sampler.info.second_order),
                                              embeddings=self._embeddings(notice))
        init_image = prepare_init_image(req) if req.init_image else None  # a bad file: one line, before any work
        check()

        texts = {"prompt": pos, "negative": neg}
        filler = empty_chunk(tokenizer)
        needed = needed_chunks(texts, filler)
        store = self._chunk_store(loras)
        cached = store.found(needed, clip_skip, self.models.cfg.text.hidden_size) if store is not None else {}
        plan = self.forced_plan or self.plan(req, text_needed=any(c.key not in cached for c in needed))
        # Whatever the plan doesn't keep resident leaves the device before the render starts.
        for name, mode in (("text", plan.text), ("unet", plan.unet), ("vae", plan.vae)):
            if mode != "resident":
                self.placement.offload(name)

        stages = []
        chunks, text_stats, plan = self._with_retry("text", plan, req, notice,
                                                    lambda p: self._text_stage(texts, needed, cached, clip_skip, p,
                                                                               emit, notice, loras))
        stages.append(text_stats)
        # Weights, schedules and chunk assembly after the cache; each role is its own A1111 batch
        # (the prompt's and the negative's chunk counts may differ: guidance then runs them apart).
        cond = pos.conditioning(chunks.__getitem__, filler).to(self.dtype)
        uncond = neg.conditioning(chunks.__getitem__, filler).to(self.dtype)
        init = None
        if init_image is not None:  # img2img: the init latent first, then the seed's noise, as A1111
            init, _, plan = self._with_retry("vae", plan, req, notice,
                                             lambda p: self._encode_stage(init_image.tensor, p, ignore, notice))
        check()
        rng = ImageRNG(req.seed, req.width, req.height, subseed=req.subseed, subseed_strength=req.subseed_strength,
                       rng=req.rng, ensd=req.ensd)
        x_t = rng.first()
        # Where a retry resumes: the sampler's state after its last completed step (its carry: the
        # step, the latent, a multistep sampler's history) and the generator's state after it (the
        # per-step noise of a retried step must be what a first try would have drawn).
        progress = {"carry": {}, "x": x_t, "rng": rng, "rng_state": rng.get_state(), "calls": 0, "init": init,
                    "t_enc": t_enc(req.strength, req.steps) if init is not None else None}
        latents, unet_stats, plan = self._with_retry("unet", plan, req, notice,
                                                     lambda p: self._unet_stage(req, cond, uncond, p, progress, emit, check,
                                                                                loras))
        stages.append(unet_stats)
        check()
        image, vae_stats, plan = self._with_retry("vae", plan, req, notice,
                                                  lambda p: self._vae_stage(latents, p, emit, notice))
        stages.append(vae_stats)
        return Result(
            image=image,
            request=req,
            seconds=time.perf_counter() - started,
            stages=stages,
            model_name=self.source.name,
            model_hash=self.models.model_hash,
            demo=self.source.demo,
            latents=latents.cpu(),
            notices=notices,
            plan=plan.describe(self.models.sizes() if plan.unet != "host" else None),
            prompts={role: prompt_summary(p) for role, p in texts.items()},
            loras=loras.summary(),
            infotext_extra={**({"VAE hash": self.models.vae_hash, "VAE": self.models.vae_name}
                               if self.models.vae_name else {}),
                            **loras.infotext(), **infotext_extra(pos, neg if req.cfg != 1.0 else None)},
        )

    def _with_retry(self, stage: str, plan: Plan, req: Params, notice, run):
        """Run a stage; on out-of-memory free everything, take the planner's cheaper plan and run
        the stage again (the U-Net resumes at the step it was on)."""
        while True:
            try:
                out, stats = run(plan)
                return out, stats, plan
            except torch.cuda.OutOfMemoryError:
                self.placement.join()
                self.placement.offload_all()
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                new = cheaper(plan, stage, self.models.sizes(), req.width, req.height) if plan.unet != "host" else None
                if new is None:
                    raise OutOfMemory(
                        f"out of GPU memory in the {STAGE_TITLES[stage]} stage even with the cheapest plan "
                        f"({plan.describe(self.models.sizes())}); try a smaller size or close other GPU programs"
                    ) from None
                notice(f"out of GPU memory in the {STAGE_TITLES[stage]}: retrying with {new.describe(self.models.sizes())}", "warning")
                plan = new

    def _acquire(self, stage: str, mode: str) -> torch.nn.Module:
        """The stage's model, built on first use and (unless running on the host) registered with
        the placement and uploaded (or joined with its prefetch)."""
        if mode == "host":
            return self.models.module(stage)
        model = self._registered(stage)
        if mode != "streamed":
            self.placement.upload(stage)
            self.placement.wait(stage)
        return model

    def _registered(self, stage: str) -> torch.nn.Module:
        """The stage's model, packed into the placement's units (the U-Net one unit per layer)."""
        model = self.models.module(stage)
        units = [m for _, m, _ in model.units()] if stage == "unet" else None
        self.placement.register(stage, model, units)
        return model

    def _release(self, stage: str, mode: str) -> None:
        self.placement.join()  # no copy is left pending behind the stage
        if mode not in ("resident", "host"):
            self.placement.offload(stage)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _embeddings(self, notice):
        """The textual-inversion embeddings (rescanned: files added, changed or removed since the
        last render count), or None without embedding folders; each file that can't be used is
        named once per engine, and the render goes on without it."""
        db = self.embeddings.index(self.models.tokenizer.ids)
        for problem in self.embeddings.untold():
            notice(f"embedding not used: {problem}", "warning")
        return db

    def merge_loras(self, stage: str, loras: RenderLoras) -> None:
        """Fold this render's LoRAs into the stage's model (a no-op when it holds them already)."""
        self.loras.merge_into(stage, self.models, self.placement, self.device, loras)

    def _chunk_store(self, loras: RenderLoras) -> ChunkStore | None:
        """The embedding cache for this encoder, tokenizer, device and dtype (None without one)."""
        if self.cache is None:
            return None
        lora = self.loras.text_signature(loras)
        return ChunkStore(self.cache, self.models.encoder_id + (f"+lora:{lora}" if lora else ""),
                          self.models.tokenizer.identity,
                          f"{self.device.type}-{str(self.dtype).removeprefix('torch.')}", self.models.model_hash)

    def _text_stage(self, texts: dict[str, RolePrompt], needed: list[Chunk], cached: dict[tuple, torch.Tensor],
                    clip_skip: int, plan: Plan, emit: Emit, notice, loras: RenderLoras):
        """The unweighted encoder output (fp16, (77, dim), on the host) of every chunk the render
        needs, by chunk key; the encoder is neither built nor moved to the device when the cache
        has every chunk."""
        meter = StageMeter("text", self.device, emit)
        chunks = dict(cached)
        missing = [c for c in needed if c.key not in chunks]
        if missing:
            self.merge_loras("text", loras)
            encoder = self._acquire("text", plan.text)
            if plan.prefetch_unet and plan.unet in ("staged", "resident"):
                self._acquire_prefetch("unet")
            meter.loaded()
            try:
                fresh: dict[tuple, torch.Tensor] = {}
                with torch.inference_mode():
                    for c in missing:
                        # One chunk a pass (the values don't depend on which chunks share a batch),
                        # rounded to fp16 on a miss too: hit and miss give the same values.
                        fresh[c.key] = encode_chunk(encoder, c, clip_skip, self.device).to("cpu", torch.float16)
            finally:
                self._release("text", plan.text)
            chunks.update(fresh)
            store = self._chunk_store(loras)
            if store is not None:
                try:
                    store.put(missing, fresh, {c.key: p.text for p in texts.values() for c in p.chunks}, clip_skip)
                except OSError as exc:
                    notice(f"embedding cache unusable ({exc.strerror or exc}): rendering without it", "warning")
                    self.cache = None
        else:
            meter.loaded()
        overall, status = cache_status(texts, cached) if self.cache is not None else (None, None)
        return chunks, meter.finish(cache=overall, cache_texts=status, skipped=not missing, note=f"text {plan.text}")

    def _acquire_prefetch(self, stage: str) -> None:
        """Start uploading the next stage's model on the side stream; ``_acquire`` joins it."""
        self._registered(stage)
        self.placement.upload(stage, prefetch=True)

    def _unet_stage(self, req: Params, cond: Conditioning, uncond: Conditioning, plan: Plan, progress: dict,
                    emit: Emit, check, loras: RenderLoras):
        self.merge_loras("unet", loras)
        x_t, rng, carry = progress["x"], progress["rng"], progress["carry"]
        rng.set_state(progress["rng_state"])  # a retry draws the noise a first try would have
        sampler = get_sampler(req.sampler)
        schedule = resolve_schedule(req.sampler, req.schedule)
        total, calls = sampler_plan(sampler.info, schedule, req.steps, carry.get("step", 0), progress["t_enc"])
        meter = StageMeter("unet", self.device, emit)
        # Every segment of a role has the same token count: whether cond and uncond run apart
        # is the same for the whole render.
        split = runs_apart(cond.segments[0], uncond.segments[0], plan.split_cfg)
        unet = self._acquire("unet", plan.unet)
        with contextlib.ExitStack() as stack:
            stack.callback(self._release, "unet", plan.unet)
            if plan.unet == "streamed":
                # Exactly the passes the rest of the render makes: nothing is prefetched past them.
                passes = calls * unet_passes(req.cfg, split=split)
                modules = [m for _, m, _ in unet.units()]
                stack.enter_context(RingStreamer(self.placement, "unet", modules, plan.resident_units,
                                                 plan.ring_bytes, passes))
            if plan.prefetch_vae and plan.vae != "host":
                self._acquire_prefetch("vae")
            meter.loaded()
            if "x" in carry:
                carry["x"] = carry["x"].to(self.device)
            t0 = time.perf_counter()

            # The denoiser counts its calls (the prompt schedule follows them); a retry resumes the count.
            denoiser = ScheduledGuidance(unet, cond.to(self.device).at, uncond.to(self.device).at, req.cfg,
                                         split=split, calls=progress["calls"])

            def on_step(i: int, t: float, x_now: torch.Tensor) -> None:
                progress["rng_state"] = rng.get_state()
                progress["calls"] = denoiser.calls
                check()
                emit(StepDone(i + 1, total, t, time.perf_counter() - t0))
                emit(memory_sample("unet", self.device))

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
        note = plan.describe(self.models.sizes()) if plan.unet != "host" else "cpu"
        return latents, meter.finish(note=note)


__all__ = ["Cancelled", "Engine", "ModelSource", "OutOfMemory", "Result", "open_model", "to_image"]

