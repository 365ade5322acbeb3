"""The engine's text stage: every chunk a render needs, from the embedding cache or encoded on
the device under the plan, and the textual-inversion embeddings and LoRA merges it takes. A part
of :class:`sdterm.engine.pipeline.Engine` (a mixin: it uses the engine's models, placement,
cache and LoRA state)."""

from __future__ import annotations

import torch

from .embedding_cache import ChunkStore
from .events import Emit
from .lora.state import RenderLoras
from .memory.meter import StageMeter
from .memory.planner import Plan
from .prompt.conditioning import Chunk, RolePrompt, cache_status, encode_chunk


class TextStage:
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

    def _let_text_go(self) -> None:
        """The text encoder leaves the device and the host (``keep_text`` off); a render that
        needs it later builds it again, with no LoRA merged."""
        self.placement.forget("text")
        self.models.drop("text")
        self.loras.forget("text")

    def _chunk_store(self, loras: RenderLoras) -> ChunkStore | None:
        """The embedding cache for this encoder, tokenizer, device and dtype (None without one)."""
        if self.cache is None:
            return None
        lora = self.loras.text_signature(loras)
        return ChunkStore(self.cache, self.models.encoder_id + (f"+lora:{lora}" if lora else ""),
                          self.models.tokenizer.identity,
                          f"{self.device.type}-{str(self.dtype).removeprefix('torch.')}", self.models.known_model_hash)

    def _text_stage(self, texts: dict[str, RolePrompt], needed: list[Chunk], cached: dict[tuple, torch.Tensor],
                    store: ChunkStore | None, clip_skip: int, plan: Plan, emit: Emit, notice, loras: RenderLoras,
                    hires: dict[str, RolePrompt]):
        """The unweighted encoder output (fp16, (77, dim), on the host) of every chunk the render
        needs (``hires``: the hires pass's schedules too), by chunk key; the encoder is neither
        built nor moved to the device when the cache has every chunk. ``cached``: what ``store``
        (:meth:`_chunk_store`, None without a cache) found; the chunks encoded here go into it."""
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
            if store is not None and self.cache is not None:
                try:
                    store.put(missing, fresh, {c.key: p.text for p in (*texts.values(), *hires.values())
                                               for c in p.chunks}, clip_skip)
                except OSError as exc:
                    notice(f"embedding cache unusable ({exc.strerror or exc}): rendering without it", "warning")
                    self.cache = None
            if not self.keep_text and self.cache is not None:  # (no cache: every render needs it)
                self._let_text_go()
        else:
            meter.loaded()
        overall, status = cache_status(texts, cached) if self.cache is not None else (None, None)
        return chunks, meter.finish(cache=overall, cache_texts=status, skipped=not missing, note=f"text {plan.text}")
