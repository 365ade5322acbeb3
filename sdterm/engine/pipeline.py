"""``Engine.generate(request, *, emit, cancelled)``: encode -> denoise -> decode, written once.

The engine keeps each model in host memory after its first use (``loading/models.py``); for each
render the planner decides where each model lives within the VRAM budget, and each stage runs under
that plan (resident, staged, streamed), retrying a cheaper plan on out-of-memory. Events, no prints.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from pathlib import Path
from typing import Callable

import torch

from ..params import Params
from .embedding_cache import EmbeddingCache
from .events import STAGE_TITLES, Emit, Notice, ignore
from .loading.models import Models, ModelSource, open_model
from .result import Cancelled, OutOfMemory, Result, to_image
from .memory.graphs import UNetGraphs
from .memory.placement import Placement, resolve_device, run_dtype
from .memory.planner import Plan, cheaper, plan_render
from .memory.tiling import choose_tile, vae_activation_bytes
from .prompt.conditioning import (empty_chunk, needed_chunks, prepare_prompts, role_prompt, schedule_steps)
from .prompt.embedding_db import EmbeddingFolders
from .prompt.report import infotext_extra, prompt_summary
from .lora.state import LoraState
from .sampling import get_sampler
from .sampling.kdiffusion import discrete_sigmas
from .sampling.rng import ImageRNG
from .preview import Previewer, TaesdSource
from .fork import Fork, resume_carry, to_host
from .fork import check as check_fork
from .sampling.img2img import t_enc
from .init_image import prepare as prepare_init_image
from .hires import hires_request, hires_steps, is_latent, upscale_image, upscale_latent
from .init_image import to_tensor
from .text_stage import TextStage
from .unet_stage import UNetStage
from .vae_stage import VaeStage

DEFAULT_BUDGET_MARGIN = 512 * 2**20
"""Without --vram-budget, leave this much of the device's free memory to others."""


class Engine(TextStage, UNetStage, VaeStage):
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
        taesd: Path | None = None,
        model_cache: Path | None = None,
        cuda_graphs: bool = True,
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
            model_cache=model_cache,
            pin=self.device.type == "cuda",
        )
        self.cuda_graphs = cuda_graphs
        """Replay the U-Net as CUDA graphs where the plan allows (``unet_stage.py``); False: eager."""
        self.unet_graphs = UNetGraphs(self.device)
        self.budget = budget
        """VRAM budget in bytes; None: the device's free memory minus a margin (no planning on CPU)."""
        self.forced_plan = plan
        """A fixed plan instead of the planner's choice (tests, experiments)."""
        self._preview: float | None = None
        """The render in progress's preview interval, trail and fork (``generate``'s arguments)."""
        self._fork: Fork | None = None
        self.taesd = TaesdSource(taesd) if taesd is not None else None
        """TAESD's decoder file for better previews (``sdterm download taesd``); None: the linear map."""
        self._trail: list | None = None
        self.cache = cache
        self.keep_text = True
        """False: the text encoder goes (device and host memory) after each text stage that used it,
        while there is an embedding cache: a one-shot command, whose later renders find their
        prompts there."""
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
        self.unet_graphs.clear()
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
        held = self.placement.held_bytes() + self.unet_graphs.held
        return free + held - DEFAULT_BUDGET_MARGIN

    def plan(self, req: Params, text_needed: bool = True, encode: bool = False) -> Plan:
        """The plan for ``req`` at its size within the budget; ``encode``: the VAE stage encodes an
        image too (img2img, a pixel hires upscale), so the encoder's weights count beside the
        decoder's (its activations are below the decoder's at the same size)."""
        budget = self.effective_budget()
        if budget is None:
            return Plan(None, text="host", unet="host", vae="host")
        lat_h, lat_w = req.height // 8, req.width // 8
        sizes = self.models.sizes()
        if encode:
            sizes = dataclasses.replace(sizes, vae=sizes.vae + sizes.encoder)
        return plan_render(
            sizes,
            budget,
            req.width,
            req.height,
            vae_decode_bytes=lambda: vae_activation_bytes(self.models.cfg.vae, lat_h, lat_w, self.dtype),
            # A tiled decode's allocator reserve runs above its allocations (H100, 1024x1536 in
            # 1280px tiles: 3.10 GiB allocated, 3.50 GiB reserved): the tile leaves an eighth free.
            vae_tile_for=lambda avail: choose_tile(self.models.cfg.vae, lat_h, lat_w, self.dtype, avail - avail // 8),
            cfg_batch=1 if req.cfg == 1.0 else 2,
            text_needed=text_needed,
        )

    # ---- the prompt, before rendering ---------------------------------------------------------

    def explain(self, text: str, steps: int = 20, sampler: str = "DDIM"):
        """How ``text`` is tokenized, chunked, weighted and where its embeddings are
        (``PromptReport``), for a display beside the prompt box: no model is built; it reads
        files (the tokenizer on the first call, embeddings), so call it off the UI thread."""
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
        preview: float | None = None,
        trail: bool = False,
        fork: Fork | None = None,
        encode_text: bool = False,
    ) -> Result:
        """Render ``request``; ``emit`` gets the events, ``cancelled()`` is polled between steps;
        ``preview``: send :class:`~.events.Preview` frames at most this many seconds apart
        (None: none; they are made off the render thread, see ``preview.py``); ``trail``: keep
        the sampler's state after every step in ``Result.trail``; ``fork``: start from one of
        them (``fork.py``); ``encode_text``: run the text encoder even where the embedding cache
        has the prompt (a warm-up's: the encoder is then read and called before a new prompt)."""
        req = request.validated()
        if fork is not None:
            check_fork(fork, req)  # one line, before any work
        self._preview, self._fork, self._trail = preview, fork, [] if trail else None
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
        second = sampler.info.second_order
        prompt, loras = self.loras.resolve(req.prompt, notice)  # <lora:...> tags out of what CLIP sees
        embeddings = self._embeddings(notice)
        pos, neg, clip_skip = prepare_prompts(req.replace(prompt=prompt), tokenizer, self.models.cfg.text.num_layers, notice,
                                              steps=schedule_steps(req.steps, second), embeddings=embeddings)
        init_image = prepare_init_image(req) if req.init_image else None  # a bad file: one line, before any work
        texts = {"prompt": pos, "negative": neg}
        hires = {}
        if req.hires:  # the second pass's prompt schedules: A1111's hires offsets over its steps
            hires = {role: role_prompt(text, tokenizer, schedule_steps(req.steps, second), embeddings=embeddings,
                                       hires_steps=schedule_steps(req.hires_pass_steps, second))
                     for role, text in (("prompt", prompt), ("negative", req.negative))}
        check()

        filler = empty_chunk(tokenizer)
        needed = needed_chunks({**texts, **{f"hires {r}": p for r, p in hires.items()}}, filler)
        store = self._chunk_store(loras)
        cached = {} if store is None or encode_text else store.found(needed, clip_skip, self.models.cfg.text.hidden_size)
        plan = self.forced_plan or self.plan(req, text_needed=any(c.key not in cached for c in needed),
                                             encode=init_image is not None)
        self._offload_unplanned(plan)
        prepared = time.perf_counter() - started
        stages = []
        chunks, text_stats, plan = self._with_retry("text", plan, req, notice,
                                                    lambda p: self._text_stage(texts, needed, cached, store, clip_skip,
                                                                               p, emit, notice, loras, hires))
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
        latents, plan = self._denoise(req, cond, uncond, plan, init, t_enc(req.strength, req.steps) if init is not None
                                      else None, "unet", emit, check, notice, loras, stages)
        final = req
        if req.hires:
            final = hires_request(req)
            latents, plan = self._hires_pass(req, final, latents, {r: p.conditioning(chunks.__getitem__, filler)
                                                                   .to(self.dtype) for r, p in hires.items()},
                                             plan, emit, check, notice, loras, stages)
        check()
        image, vae_stats, plan = self._with_retry("vae", plan, final, notice,
                                                  lambda p: self._vae_stage(latents, p, emit, notice))
        stages.append(vae_stats)
        return Result(
            image=image,
            request=req,
            seconds=time.perf_counter() - started,
            prepare_seconds=prepared,
            stages=stages,
            model_name=self.source.name,
            model_hash=self.models.model_hash,
            demo=self.source.demo,
            latents=latents.cpu(),
            trail=self._trail,
            notices=notices,
            plan=plan.describe(self.models.sizes() if plan.unet != "host" else None),
            prompts={role: prompt_summary(p) for role, p in texts.items()},
            loras=loras.summary(),
            infotext_extra={**({"VAE hash": self.models.vae_hash, "VAE": self.models.vae_name}
                               if self.models.vae_name else {}),
                            **loras.infotext(), **infotext_extra(pos, neg if req.cfg != 1.0 else None)},
        )

    def _offload_unplanned(self, plan: Plan) -> None:
        """Whatever ``plan`` doesn't keep resident leaves the device before its stages start."""
        for name, mode in (("text", plan.text), ("unet", plan.unet), ("vae", plan.vae)):
            if mode != "resident":
                self.placement.offload(name)
        if plan.unet != "resident":
            self.unet_graphs.clear()  # they read the U-Net's device addresses, and hold their pool

    def _denoise(self, req: Params, cond, uncond, plan: Plan, init, t: int | None, stage: str, emit, check, notice,
                 loras, stages) -> tuple[torch.Tensor, Plan]:
        """One sampler run of ``req`` from the seed's noise (img2img from ``init`` at t_enc ``t``)."""
        rng = ImageRNG(req.seed, req.width, req.height, subseed=req.subseed, subseed_strength=req.subseed_strength,
                       rng=req.rng, ensd=req.ensd)
        x_t = rng.first()
        # Where a retry resumes: the sampler's state after its last completed step (its carry: the
        # step, the latent, a multistep sampler's history) and the generator's state after it (the
        # per-step noise of a retried step must be what a first try would have drawn).
        previewer = None
        if self._preview is not None:  # TAESD frames too where the plan leaves room for it
            taesd = self.taesd.for_pass(self.device, self.dtype, self.effective_budget(), plan.estimate, req.width,
                                        req.height, notice) if self.taesd is not None else None
            previewer = Previewer(emit, self._preview, discrete_sigmas(self.models.cfg.schedule), stage, self.device,
                                  (req.height // 8, req.width // 8), taesd=taesd)
        progress = {"carry": {}, "x": x_t, "rng": rng, "rng_state": rng.get_state(), "calls": 0, "init": init,
                    "t_enc": t, "stage": stage, "preview": previewer}
        if stage == "unet":  # the first sampler run: a fork starts there, a trail is kept there
            progress["trail"] = self._trail
            if self._fork is not None and self._fork.at.step > 0:
                progress.update(carry=resume_carry(self._fork, req, self.device), rng_state=self._fork.at.rng_state,
                                calls=self._fork.at.calls)
        try:
            latents, stats, plan = self._with_retry(stage, plan, req, notice,
                                                    lambda p: self._unet_stage(req, cond, uncond, p, progress, emit,
                                                                               check, loras))
        finally:
            if previewer is not None:
                previewer.close()
                previewer.taesd = None  # its device copy goes with the pass
        if progress.get("trail"):
            progress["trail"][:] = [to_host(s) for s in progress["trail"]]  # one copy at the end, not one a step
        stages.append(stats)
        return latents, plan

    def _hires_pass(self, req: Params, final: Params, latents: torch.Tensor, conds: dict, plan: Plan, emit, check,
                    notice, loras, stages) -> tuple[torch.Tensor, Plan]:
        """The hires fix's upscale and second pass (``sdterm/engine/hires.py``); ``final``: the
        second pass as a request of its own (:func:`hires_request`), planned at its size."""
        latent = is_latent(req)
        hplan = self.forced_plan or self.plan(final, text_needed=False, encode=not latent)
        if latent:
            init = upscale_latent(latents, req)
        else:  # decode at the base size under the first plan, resize, encode at the hires size
            image, stats, plan = self._with_retry("vae", plan, req, notice,
                                                  lambda p: self._vae_stage(latents, p, ignore, notice,
                                                                            convert=functools.partial(to_image, truncate=True)))
            stages.append(stats)
            pixels = to_tensor(upscale_image(image, req))
            check()
            self._offload_unplanned(hplan)
            init, stats, hplan = self._with_retry("vae", hplan, final, notice,
                                                  lambda p: self._encode_stage(pixels, p, ignore, notice))
            stages.append(stats)
        check()
        self._offload_unplanned(hplan)
        return self._denoise(final, conds["prompt"], conds["negative"], hplan, init, hires_steps(req)[1], "hires",
                             emit, check, notice, loras, stages)

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
                new = (cheaper(plan, "unet" if stage == "hires" else stage, self.models.sizes(), req.width, req.height)
                       if plan.unet != "host" else None)
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
        """The stage's model, packed into the placement's units (the U-Net one unit per layer); a
        model built straight into its units' host buffers has them adopted, not copied."""
        model = self.models.module(stage)
        self.placement.register(stage, model, self.models.units(stage, model), hosts=self.models.unit_hosts(stage))
        return model

    def _release(self, stage: str, mode: str) -> None:
        self.placement.join()  # no copy is left pending behind the stage
        if mode not in ("resident", "host"):
            self.placement.offload(stage)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _acquire_prefetch(self, stage: str) -> None:
        """Start uploading the next stage's model on the side stream; ``_acquire`` joins it."""
        self._registered(stage)
        self.placement.upload(stage, prefetch=True)


__all__ = ["Cancelled", "Engine", "ModelSource", "OutOfMemory", "Result", "open_model", "to_image"]

