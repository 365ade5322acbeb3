"""The LoRAs of an engine: which a render's prompt asks for (A1111's ``<lora:NAME:W>`` tags),
their files, and what is merged into each model now."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...prompt_syntax import NetworkTag, NetworkTagError, extra_networks
from ..prompt.tokenizer import PromptError
from .files import LoraError, LoraFile, Targets
from .folders import LoraFolders
from .merge import Applied, Merger


@dataclass
class RenderLoras:
    """What one render uses: the LoRAs found (with the tag that named each) and their weights per model."""

    used: list[tuple[NetworkTag, LoraFile]] = field(default_factory=list)

    def applied(self, model: str) -> list[Applied]:
        return [Applied(lora, tag.te if model == "text" else tag.unet, tag.dyn) for tag, lora in self.used]

    def infotext(self) -> dict[str, str]:
        """``Lora hashes`` as A1111 writes it: each name as mentioned (``:`` and ``,`` removed),
        in order, once."""
        seen: dict[str, str] = {}
        for tag, lora in self.used:
            name = tag.name.replace(":", "").replace(",", "")
            seen.setdefault(name, f"{name}: {lora.hash}")
        return {"Lora hashes": ", ".join(seen.values())} if seen else {}

    def summary(self) -> list[dict]:
        return [{"name": tag.name, "te": tag.te, "unet": tag.unet, "dyn": tag.dyn, "hash": lora.hash,
                 "file": str(lora.path)} for tag, lora in self.used]


class LoraState:
    def __init__(self, cfg, folders: list[Path], optional: list[Path]):
        self.cfg = cfg
        self.folders = LoraFolders(folders, optional=optional)
        self._targets: Targets | None = None
        self.mergers = {"unet": Merger("unet"), "text": Merger("text")}
        self._told: set[str] = set()

    @property
    def targets(self) -> Targets:
        if self._targets is None:
            self._targets = Targets(self.cfg)
        return self._targets

    def resolve(self, prompt: str, notice: Callable[..., None]) -> tuple[str, RenderLoras]:
        """The prompt without its tags (what CLIP sees) and the LoRAs they name. A LoRA that
        can't be found or used is one line and the render goes on without it (as A1111); a tag
        whose weight isn't a number stops the render (PromptError)."""
        try:
            text, tags = extra_networks(prompt)
        except NetworkTagError as exc:
            raise PromptError(str(exc)) from None
        out = RenderLoras()
        if not tags:
            return text, out
        for problem in self.folders.problems():
            self._tell(notice, problem)
        for tag in tags:
            if tag.kind != "lora":
                notice(f"{tag.text}: {tag.kind} networks are not supported; the tag was left out of the prompt",
                       "warning")
                continue
            try:
                lora = self.folders.load(tag.name, self.targets)
            except LoraError as exc:
                notice(str(exc), "warning")
                continue
            for line in lora.notes():
                self._tell(notice, line)
            out.used.append((tag, lora))
        return text, out

    def _tell(self, notice, line: str) -> None:
        if line not in self._told:
            self._told.add(line)
            notice(line, "warning")

    def text_signature(self, loras: RenderLoras) -> str:
        """What the text encoder's output depends on besides its weights (the cache key)."""
        return self.mergers["text"].signature(loras.applied("text"))

    def merge(self, stage: str, module: torch.nn.Module, loras: RenderLoras,
              before_write: Callable[[set[torch.nn.Module]], None], device: torch.device | None = None) -> int:
        """Make ``module`` (the U-Net or the text encoder) hold this render's LoRAs, the deltas
        computed on ``device``; the layers rewritten."""
        merger = self.mergers[stage]
        applied = loras.applied(stage)
        if not merger.held and not any(a.weight for a in applied):
            return 0
        return merger.apply(_layers(stage, module), applied, before_write, device)

    def forget(self, stage: str) -> None:
        """The model ``stage`` was let go: the next one built holds no LoRA."""
        self.mergers[stage] = Merger(stage)

    def merge_into(self, stage: str, models, placement, device: torch.device, loras: RenderLoras) -> None:
        """Fold ``loras`` into the engine's model for ``stage`` (built if needed); the units holding
        rewritten layers go back to their host copy first, after the device is done with whatever
        it was copying from them. The deltas are computed on the GPU when there is one."""
        def before_write(modules: set[torch.nn.Module]) -> None:
            models.before_change(stage)  # the model cache's copy is written from these weights
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            placement.offload_modules(stage, modules)

        if loras.used or self.mergers[stage].held:
            self.merge(stage, models.module(stage), loras, before_write, device if device.type == "cuda" else None)


def _layers(stage: str, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's Linear and Conv2d layers by the names :class:`Targets` gives them."""
    if stage == "unet":
        return {n: m for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    from ..networks.clip import clip_inner

    return {"text_model." + n: m for n, m in clip_inner(module).named_modules() if isinstance(m, torch.nn.Linear)}
