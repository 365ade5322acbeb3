"""``Engine.generate(request, *, emit, cancelled)``: encode -> denoise -> decode, written once.

The engine keeps each model in host memory after its first use; a stage moves its model to the
device, runs, and gives the device memory back (staged residency). It reports through typed
events and never prints.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..config import ConfigError, ModelConfig, RenderRequest, default_config_path, load_model_config
from . import ddim
from .checkpoint import (
    UNET_PREFIX,
    VAE_PREFIX,
    Checkpoint,
    CheckpointError,
    identify,
    verify_module,
    load_module,
    open_checkpoint,
    remembered_sha256,
    resolve_model_path,
    short_hash,
)
from .embedding_cache import EmbeddingCache, cache_key
from .events import STAGE_TITLES, Emit, Notice, StageStats, StepDone, ignore
from .placement import ALIGN, Placement, StageMeter, resolve_device, run_dtype
from .planner import ModelSizes, Plan, cheaper, plan_render
from .tiling import choose_tile, decode_latents, vae_activation_bytes
from .text import (
    PromptTokenizer,
    Tokens,
    build_text_encoder,
    encode,
    fetch_tokenizer,
    find_tokenizer,
    verify_text_encoder,
)
from .unet import UNetModel
from .vae import VAEDecoder


DEFAULT_BUDGET_MARGIN = 512 * 2**20
"""Without --vram-budget, leave this much of the device's free memory to others."""


class Cancelled(Exception):
    """The render was cancelled; nothing was written."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a checkpoint file (or demo folder) and its architecture."""

    checkpoint: Path | None
    """None for random weights (measurements without a checkpoint)."""
    config: ModelConfig
    name: str
    """What A1111 shows as ``Model:`` (the file name without extension, or the folder name)."""
    tokenizer_dir: Path | None

    @property
    def demo(self) -> bool:
        return self.config.demo or self.checkpoint is None


def open_model(path: str | Path, *, config_path: str | Path | None = None, data_dir: Path | None = None) -> ModelSource:
    """Resolve ``--model``: a checkpoint file, or a folder with model.safetensors + config.yaml.

    The architecture comes from ``config_path``, else a ``config.yaml`` in the folder, else a
    ``<name>.yaml`` beside the file, else configs/sd-v1.yaml.
    """
    ckpt = resolve_model_path(path)
    given = Path(path).expanduser()
    folder = given if given.is_dir() else None
    if config_path is None:
        for cand in ([folder / "config.yaml"] if folder else []) + [ckpt.with_suffix(".yaml")]:
            if cand.is_file():
                config_path = cand
                break
    cfg = load_model_config(config_path or default_config_path())
    name = folder.name if folder else ckpt.stem
    return ModelSource(ckpt, cfg, name, find_tokenizer(ckpt, data_dir))


@dataclass
class Result:
    image: Image.Image
    request: RenderRequest
    seconds: float
    stages: list[StageStats]
    model_name: str
    model_hash: str
    demo: bool
    latents: torch.Tensor = field(repr=False)
    notices: list[str] = field(default_factory=list)
    plan: str = "staged"
    """How the models were placed for this render (the planner's description)."""


def latents_noise(seed: int, width: int, height: int) -> tuple[torch.Tensor, torch.Generator]:
    """The starting noise x_T, drawn on the CPU in fp32 so a seed means the same image on any device.

    Returns the generator too: eta > 0 draws its per-step noise from it, also on the CPU.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, 4, height // 8, width // 8), generator=gen, dtype=torch.float32), gen


def to_image(decoded: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> an RGB PIL image."""
    x = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), "RGB")


class Engine:
    """Holds the models of one checkpoint on the host and renders requests on one device."""

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
    ):
        self.source = source
        self.budget = budget
        """VRAM budget in bytes; None: the device's free memory minus a margin (no planning on CPU)."""
        self.forced_plan = plan
        """A fixed plan instead of the planner's choice (tests, experiments)."""
        self._sizes: ModelSizes | None = None
        self.cache = cache
        self.random_seed = random_seed
        self.device = resolve_device(device)
        self.dtype = run_dtype(self.device)
        self.cfg = source.config
        self.placement = Placement(self.device)
        self.data_dir = data_dir
        self.hash_memo = hash_memo
        self._tokenizer_dir = tokenizer_dir or source.tokenizer_dir
        self._tokenizer: PromptTokenizer | None = None
        self._modules: dict[str, torch.nn.Module] = {}
        self._ckpt: Checkpoint | None = None
        self._sha256: str | None = None
        # Stage order as data; the factories are attributes so tests can see whether one was called.
        self.factories: dict[str, Callable[[], torch.nn.Module]] = {
            "text": self._build_text,
            "unet": self._build_unet,
            "vae": self._build_vae,
        }
        if source.checkpoint is not None:
            self._verify()

    def _verify(self) -> None:
        """Fail now, with one line, if the file is unreadable, unsafe, another architecture or
        incomplete: every tensor of all three models is checked by name and shape, none is read."""
        ckpt = self._checkpoint()
        what = identify(ckpt)
        if what:
            raise CheckpointError(f"{ckpt.path}: this is {what}; sdterm runs Stable Diffusion v1")
        with torch.device("meta"):
            unet, vae = UNetModel(self.cfg.unet), VAEDecoder(self.cfg.vae)
        verify_module(unet, ckpt, UNET_PREFIX)
        verify_module(vae, ckpt, VAE_PREFIX)
        verify_text_encoder(self.cfg.text, ckpt)

    # ---- models ------------------------------------------------------------------------------

    def _checkpoint(self) -> Checkpoint:
        if self._ckpt is None:
            self._ckpt = open_checkpoint(self.source.checkpoint)
        return self._ckpt

    def _random(self, build: Callable[[], torch.nn.Module], offset: int) -> torch.nn.Module:
        """Random weights, reproducible per (seed, stage), without disturbing the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_seed * 3 + offset)
            return build().to(self.dtype).eval().requires_grad_(False)

    def _build_text(self) -> torch.nn.Module:
        if self.source.checkpoint is None:
            return self._random(lambda: build_text_encoder(self.cfg.text, None, torch.float32), 0)
        return build_text_encoder(self.cfg.text, self._checkpoint(), self.dtype)

    def _build_unet(self) -> torch.nn.Module:
        if self.source.checkpoint is None:
            return self._random(lambda: UNetModel(self.cfg.unet), 1)
        with torch.device("meta"):
            unet = UNetModel(self.cfg.unet)
        return load_module(unet, self._checkpoint(), UNET_PREFIX, self.dtype)

    def _build_vae(self) -> torch.nn.Module:
        if self.source.checkpoint is None:
            return self._random(lambda: VAEDecoder(self.cfg.vae), 2)
        with torch.device("meta"):
            vae = VAEDecoder(self.cfg.vae)
        return load_module(vae, self._checkpoint(), VAE_PREFIX, self.dtype)

    def module(self, stage: str) -> torch.nn.Module:
        """The stage's model in host memory, built from the checkpoint on first use."""
        if stage not in self._modules:
            self._modules[stage] = self.factories[stage]()
            if self._ckpt is not None and len(self._modules) == len(self.factories):
                self._ckpt.close()  # every model is built: release the file mapping
                self._ckpt = None
        return self._modules[stage]

    def set_modules(self, text=None, unet=None, vae=None) -> None:
        """Use already-built modules (e.g. full-size random weights) instead of the checkpoint."""
        for stage, m in (("text", text), ("unet", unet), ("vae", vae)):
            if m is not None:
                self._modules[stage] = m.to(self.dtype).eval().requires_grad_(False)

    @property
    def tokenizer(self) -> PromptTokenizer:
        if self._tokenizer is None:
            folder = self._tokenizer_dir
            if folder is None:
                if self.data_dir is None:
                    raise CheckpointError("no CLIP tokenizer found (set SDTERM_TOKENIZER to a folder with vocab.json and merges.txt)")
                folder = fetch_tokenizer(self.data_dir)
            self._tokenizer = PromptTokenizer(folder, self.cfg.text.max_positions)
        return self._tokenizer

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            if self.source.checkpoint is None:
                self._sha256 = "0" * 64
            else:
                self._sha256 = remembered_sha256(self.source.checkpoint, self.hash_memo)
        return self._sha256

    @property
    def encoder_id(self) -> str:
        """Identity of the text-encoder weights: the checkpoint's sha256 (remembered per path, size
        and mtime), or the architecture and seed for random weights."""
        if self.source.checkpoint is None:
            return f"random:{self.cfg.text}:{self.random_seed}"
        return f"sha256:{self.sha256}"

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's model hash: the first 10 hex digits of the file's sha256."""
        return short_hash(self.sha256)

    # ---- planning ----------------------------------------------------------------------------

    def set_budget(self, budget: int | None) -> None:
        """Change the VRAM budget (None: the device's free memory minus a margin). Models leave
        the device; the next render plans and uploads again."""
        self.budget = budget
        self.placement.offload_all()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sizes(self) -> ModelSizes:
        """Bytes of each model and U-Net unit in the run dtype (from meta-device modules)."""
        if self._sizes is None:
            from .text import clip_config

            itemsize = torch.tensor([], dtype=self.dtype).element_size()

            def nbytes(m: torch.nn.Module) -> int:
                return sum(-(-t.numel() * itemsize // ALIGN) * ALIGN for t in m.parameters())

            from transformers import CLIPTextModel

            with torch.device("meta"):
                unet, vae, text = UNetModel(self.cfg.unet), VAEDecoder(self.cfg.vae), CLIPTextModel(clip_config(self.cfg.text))
            units = tuple((name, nbytes(m), level) for name, m, level in unet.units())
            self._sizes = ModelSizes(nbytes(text), sum(b for _, b, _ in units), nbytes(vae), units)
        return self._sizes

    def effective_budget(self) -> int | None:
        """The VRAM budget in force; None on the CPU, where nothing moves."""
        if self.device.type != "cuda":
            return None
        if self.budget is not None:
            return self.budget
        free, _total = torch.cuda.mem_get_info(self.device)
        held = sum(self.placement.device_bytes(n) for n in self.placement.models)
        return free + held - DEFAULT_BUDGET_MARGIN

    def plan(self, req: RenderRequest, text_needed: bool = True) -> Plan:
        budget = self.effective_budget()
        if budget is None:
            return Plan(None, text="host", unet="host", vae="host")
        lat_h, lat_w = req.height // 8, req.width // 8
        return plan_render(
            self.sizes(),
            budget,
            req.width,
            req.height,
            vae_decode_bytes=lambda: vae_activation_bytes(self.cfg.vae, lat_h, lat_w, self.dtype),
            vae_tile_for=lambda avail: choose_tile(self.cfg.vae, lat_h, lat_w, self.dtype, avail),
            cfg_batch=1 if req.cfg == 1.0 else 2,
            text_needed=text_needed,
        )

    # ---- rendering ---------------------------------------------------------------------------

    def generate(
        self,
        request: RenderRequest,
        *,
        emit: Emit = ignore,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Result:
        req = request.validated()
        started = time.perf_counter()
        notices: list[str] = []

        def notice(message: str, level: str = "info") -> None:
            notices.append(message)
            emit(Notice(message, level))

        def check() -> None:
            if cancelled():
                raise Cancelled()

        tok = self.tokenizer
        pos, neg = tok(req.prompt), tok(req.negative)
        if not req.prompt.strip():
            notice("empty prompt: rendering unconditionally")
        if len(pos.chunks) > 1:
            notice(f"prompt is {pos.n_tokens} tokens: encoded as {len(pos.chunks)} chunks of {tok.chunk_tokens}")
        check()

        texts = {"prompt": (req.prompt, pos), "negative": (req.negative, neg)}
        if len(pos.chunks) != len(neg.chunks):
            texts["padding"] = ("", tok(""))
        cached = self._cached(texts)
        plan = self.forced_plan or self.plan(req, text_needed=len(cached) < len(texts))
        # Whatever the plan doesn't keep resident leaves the device before the render starts.
        for name, mode in (("text", plan.text), ("unet", plan.unet), ("vae", plan.vae)):
            if mode != "resident":
                self.placement.offload(name)

        stages = []
        embs, text_stats, plan = self._with_retry("text", plan, req, notice,
                                                  lambda p: self._text_stage(texts, cached, p, emit, notice))
        stages.append(text_stats)
        cond, uncond = self._pair(embs)
        check()
        x_t, gen = latents_noise(req.seed, req.width, req.height)
        progress = {"step": 0, "x": x_t, "gen": gen}
        latents, unet_stats, plan = self._with_retry("unet", plan, req, notice,
                                                     lambda p: self._unet_stage(req, cond, uncond, p, progress, emit, check))
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
            model_hash=self.model_hash,
            demo=self.source.demo,
            latents=latents.cpu(),
            notices=notices,
            plan=plan.describe(self.sizes() if plan.unet != "host" else None),
        )

    def _with_retry(self, stage: str, plan: Plan, req: RenderRequest, notice, run):
        """Run a stage; on out-of-memory free everything, take the planner's cheaper plan and run
        the stage again (the U-Net resumes at the step it was on)."""
        while True:
            try:
                out, stats = run(plan)
                return out, stats, plan
            except torch.cuda.OutOfMemoryError:
                self.placement.offload_all()
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                new = cheaper(plan, stage, self.sizes(), req.width, req.height) if plan.unet != "host" else None
                if new is None:
                    raise OutOfMemory(
                        f"out of GPU memory in the {STAGE_TITLES[stage]} stage even with the cheapest plan "
                        f"({plan.describe(self.sizes())}); try a smaller size or close other GPU programs"
                    ) from None
                notice(f"out of GPU memory in the {STAGE_TITLES[stage]}: retrying with {new.describe(self.sizes())}", "warning")
                plan = new

    def _acquire(self, stage: str, mode: str) -> torch.nn.Module:
        """The stage's model, built on first use and (unless running on the host) registered with
        the placement and uploaded (or joined with its prefetch)."""
        model = self.module(stage)
        if mode != "host":
            units = [m for _, m, _ in model.units()] if stage == "unet" else None
            self.placement.register(stage, model, units)
            if mode != "streamed":
                self.placement.upload(stage)
                self.placement.wait(stage)
        return model

    def _release(self, stage: str, mode: str) -> None:
        if mode not in ("resident", "host"):
            self.placement.offload(stage)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _cached(self, texts: dict[str, tuple[str, Tokens]]) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return {}
        tok, dim = self.tokenizer, self.cfg.text.hidden_size
        found = {}
        for role, (text, _) in texts.items():
            hit = self.cache.get(cache_key(self.encoder_id, tok.identity, text), dim)
            if hit is not None:
                found[role] = hit
        return found

    def _text_stage(self, texts: dict[str, tuple[str, Tokens]], cached: dict[str, torch.Tensor], plan: Plan, emit: Emit, notice):
        """Embeddings (fp16, (tokens, dim), on the host) for each role; the encoder is neither built
        nor moved to the device when the cache has every text."""
        meter = StageMeter("text", self.device, emit)
        embs = dict(cached)
        missing = [role for role in texts if role not in embs]
        if missing:
            encoder = self._acquire("text", plan.text)
            if plan.prefetch_unet and plan.unet in ("staged", "resident"):
                self._acquire_prefetch("unet")
            meter.loaded()
            try:
                by_text: dict[str, torch.Tensor] = {}
                with torch.inference_mode():
                    for role in missing:
                        text, tokens = texts[role]
                        if text not in by_text:
                            # Rounded to fp16 on a miss too: hit and miss feed the U-Net the same values.
                            by_text[text] = encode(encoder, tokens, self.device)[0].to("cpu", torch.float16)
            finally:
                self._release("text", plan.text)
            fresh = {role: by_text[texts[role][0]] for role in missing}
            embs.update(fresh)
            self._store(fresh, texts, notice)
        else:
            meter.loaded()
        status = None
        if self.cache is not None:
            status = {role: ("hit" if role in cached else "miss") for role in texts}
        overall = None
        if status:
            overall = "hit" if not missing else ("miss" if len(missing) == len(texts) else "partial")
        return embs, meter.finish(cache=overall, cache_texts=status, skipped=not missing, note=f"text {plan.text}")

    def _acquire_prefetch(self, stage: str) -> None:
        model = self.module(stage)
        units = [m for _, m, _ in model.units()] if stage == "unet" else None
        self.placement.register(stage, model, units)
        self.placement.upload(stage, prefetch=True)

    def _store(self, embs: dict[str, torch.Tensor], texts: dict[str, tuple[str, Tokens]], notice) -> None:
        if self.cache is None:
            return
        stored: set[str] = set()
        for role, emb in embs.items():
            text = texts[role][0]
            key = cache_key(self.encoder_id, self.tokenizer.identity, text)
            if key in stored:
                continue
            stored.add(key)
            try:
                self.cache.put(key, emb, prompt=text, model_hash=self.model_hash)
            except OSError as exc:
                notice(f"embedding cache unusable ({exc.strerror or exc}): rendering without it", "warning")
                self.cache = None
                return

    def _pair(self, embs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, tokens, dim) cond and uncond in the run dtype, with the same token count: cond and
        uncond share one U-Net batch, so the shorter is padded with the empty prompt's chunk (as
        AUTOMATIC1111 does)."""
        cond, uncond = embs["prompt"], embs["negative"]
        n = max(cond.shape[0], uncond.shape[0])
        if "padding" in embs:
            pad = embs["padding"]
            cond = torch.cat([cond, *[pad] * ((n - cond.shape[0]) // pad.shape[0])])
            uncond = torch.cat([uncond, *[pad] * ((n - uncond.shape[0]) // pad.shape[0])])
        return cond[None].to(self.dtype), uncond[None].to(self.dtype)

    def _unet_stage(self, req: RenderRequest, cond, uncond, plan: Plan, progress: dict, emit: Emit, check):
        x_t, gen = progress["x"], progress["gen"]
        schedule = ddim.Schedule.make(self.cfg.schedule, req.steps)
        meter = StageMeter("unet", self.device, emit)
        unet = self._acquire("unet", plan.unet)
        streamer = None
        if plan.unet == "streamed":
            modules = [m for _, m, _ in unet.units()]
            streamer = self.placement.streamed("unet", modules, plan.resident_units, plan.ring_bytes)
            streamer.__enter__()
        try:
            if plan.prefetch_vae and plan.vae != "host":
                self._acquire_prefetch("vae")
            meter.loaded()
            x = x_t.to(self.device)
            denoise = ddim.guided(unet, cond.to(self.device), uncond.to(self.device), req.cfg, split=plan.split_cfg)
            t0 = time.perf_counter()

            def on_step(i: int, t: int, x_now: torch.Tensor) -> None:
                progress["step"], progress["x"] = i + 1, x_now  # where a retry resumes
                check()
                emit(StepDone(i + 1, req.steps, t, time.perf_counter() - t0))

            def noise() -> torch.Tensor:
                return torch.randn(x_t.shape, generator=gen, dtype=torch.float32).to(self.device)

            with torch.inference_mode():
                latents = ddim.sample(denoise, x, schedule, eta=req.eta, noise=noise, on_step=on_step,
                                      start=progress["step"])
        finally:
            if streamer is not None:
                streamer.__exit__(None, None, None)
            self._release("unet", plan.unet)
        note = plan.describe(self.sizes()) if plan.unet != "host" else "cpu"
        return latents, meter.finish(note=note)

    def _vae_stage(self, latents: torch.Tensor, plan: Plan, emit: Emit, notice):
        meter = StageMeter("vae", self.device, emit)
        vae = self._acquire("vae", plan.vae)
        try:
            meter.loaded()
            with torch.inference_mode():
                z = latents.to(self.device)
                decoded = decode_latents(vae, z, plan.vae_tile)
                if not torch.isfinite(decoded).all() and decoded.dtype != torch.float32:
                    # fp16 overflow gives NaN/inf (a black image): decode again in fp32.
                    notice("VAE output overflowed in fp16; decoded again in fp32", "warning")
                    decoded = decode_latents(vae.float(), z, plan.vae_tile)
                image = to_image(decoded)
        finally:
            if vae.post_quant_conv.weight.dtype != self.dtype:  # the fp32 fallback replaced the device copy
                self.placement.offload("vae")
            self._release("vae", plan.vae)
        tiled = f", tiled {plan.vae_tile * 8}px" if plan.vae_tile else ""
        return image, meter.finish(note=f"vae {plan.vae}{tiled}")


class OutOfMemory(RuntimeError):
    """Out of device memory even with the cheapest plan; one line for the user."""


__all__ = [
    "Cancelled",
    "OutOfMemory",
    "ConfigError",
    "Engine",
    "ModelSource",
    "Result",
    "open_model",
    "latents_noise",
]
