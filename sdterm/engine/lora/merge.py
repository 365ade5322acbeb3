"""Folding LoRA deltas into a model's weights, and taking them out again.

Merged, not hooked: a layer a LoRA touches gets ``W = W0 + sum(multiplier * delta)``, computed in
fp32 from the layer's original weights ``W0`` (kept aside on the host the first time a LoRA touches
the layer) and rounded once to the model's dtype. The weights live in the placement's packed host
units, so resident, staged and streamed plans then run the merged model unchanged, with no cost
per step. Each layer remembers which LoRAs and weights it holds: a render with the same set does
nothing, a changed weight recomputes only the layers that LoRA touches, and a LoRA dropped from
the prompt puts its layers' original weights back.

A LoRA named twice in a prompt is applied once per mention with the last mention's weights, as
AUTOMATIC1111 (1.6 and later) does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .files import LoraFile


@dataclass(frozen=True)
class Applied:
    """A LoRA in a render: the file and its weight on one model."""

    lora: LoraFile
    weight: float
    dyn: int | None = None


class Merger:
    """The LoRA state of one model (the U-Net or the text encoder)."""

    def __init__(self, model: str):
        self.model = model
        self.pristine: dict[str, torch.Tensor] = {}
        """Original weights of the layers a LoRA holds now, on the host."""
        self.held: dict[str, tuple] = {}
        """Layer -> the signature of the LoRAs merged into it now."""

    def apply(self, layers: dict[str, torch.nn.Module], wanted: list[Applied],
              before_write: Callable[[set[torch.nn.Module]], None], device: torch.device | None = None) -> int:
        """Make ``layers`` (name -> Linear/Conv2d) hold exactly ``wanted``'s deltas for this model.
        ``before_write(modules)`` runs once before any weight is written (the placement sends
        those modules' units back to their host copy). The deltas are computed on ``device``
        (a GPU does a rank-128 LoRA on the full U-Net in a fraction of a second; default the
        host). Returns the layers rewritten."""
        wanted = [a for a in _last_weights(wanted) if a.weight != 0]
        by_layer: dict[str, list[Applied]] = {}
        for a in wanted:
            for target, mod in a.lora.modules.items():
                if mod.model == self.model and target in layers:
                    by_layer.setdefault(target, []).append(a)
        signature = {t: tuple((a.lora.hash, str(a.lora.path), a.weight, a.dyn) for a in apps)
                     for t, apps in by_layer.items()}
        changed = [t for t in set(signature) | set(self.held) if signature.get(t) != self.held.get(t)]
        if not changed:
            return 0
        before_write({layers[t] for t in changed})
        for t in changed:
            weight = layers[t].weight
            if t not in self.pristine:
                self.pristine[t] = weight.data.detach().to("cpu", copy=True)
            base = self.pristine[t]
            if t in signature:
                w = base.to(device or "cpu", torch.float32, copy=True)  # never base itself (fp32 on the CPU)
                for a in by_layer[t]:
                    w += a.lora.modules[t].delta(base.shape, a.dyn, device) * a.weight
                weight.data.copy_(w.to(weight.dtype))
                self.held[t] = signature[t]
            else:  # no LoRA touches it any more: the original back, and no copy kept
                weight.data.copy_(base)
                del self.pristine[t]
                del self.held[t]
        return len(changed)

    def signature(self, wanted: list[Applied]) -> str:
        """What the merged model's outputs depend on (the embedding cache's key for the text
        encoder): each LoRA's hash and weight, in order; "" without any."""
        parts = [f"{a.lora.hash}*{a.weight:g}" + (f"/{a.dyn}" if a.dyn else "")
                 for a in _last_weights(wanted) if a.weight != 0 and any(
                     m.model == self.model for m in a.lora.modules.values())]
        return ",".join(parts)


def _last_weights(wanted: list[Applied]) -> list[Applied]:
    """Each mention of a LoRA with the weights of its last mention (A1111 1.6+)."""
    last = {id(a.lora): a for a in wanted}
    return [Applied(a.lora, last[id(a.lora)].weight, last[id(a.lora)].dyn) for a in wanted]
