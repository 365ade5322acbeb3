"""A LoRA file: read safely, its keys mapped onto sdterm's module names, its A1111 hash.

Layouts (by key, not by extension):

* kohya-ss: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and
  ``lora_te_<module>...`` for the text encoder, ``<module>`` being the module's path with ``_``
  for ``.``: in diffusers' names (``down_blocks_0_attentions_0_...``, most files) or the original
  LDM names (``input_blocks_1_1_...``, extracted LoRAs). LyCORIS LoCon uses the same parts on
  convolutions (a kxk down, a 1x1 up) and may add ``lora_mid.weight`` (Tucker).
* diffusers/PEFT: ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` and
  ``text_encoder.text_model...``; their alpha, where saved, is in the safetensors metadata
  (``lora_adapter_metadata``), else alpha = rank. The older diffusers layout
  (``...processor.to_q_lora.down.weight``, ``self_attn.to_q_lora``, ``mlp.fc1.lora_linear_layer``)
  is read too.

diffusers' U-Net names become LDM names by AUTOMATIC1111's table (``convert_diffusers_name_to_
compvis``), written here for any ``num_res_blocks``: level i's resnet/attention j is input block
``1 + (n+1) i + j`` on the way down and output block ``(n+1) i + j`` on the way up; resnet layers
are renamed (conv1 -> in_layers.2, conv2 -> out_layers.3, norm1 -> in_layers.0, norm2 ->
out_layers.0, time_emb_proj -> emb_layers.1, conv_shortcut -> skip_connection).

A key that maps to no layer is counted, never silently dropped; a file whose keys are for another
architecture (SDXL's ``lora_te2_``, widths that don't fit) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading.checkpoint import CheckpointError, first_line, sniff_format, unsafe_pickle_reason

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")
MAX_FILE_BYTES = 4 * 2**30
"""A LoRA bigger than this is a model, not a LoRA."""


class LoraError(CheckpointError):
    """A LoRA file can't be used; one line naming it."""


@dataclass
class LoraModule:
    """One layer's low-rank delta: ``up @ down`` (with ``mid``: Tucker), times ``scale``."""

    target: str
    """The layer's name in sdterm's model (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``,
    ``text_model.encoder.layers.0.self_attn.q_proj``)."""
    model: str
    """``unet`` or ``text``."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    scale: float | None = None
    """An explicit scale (rare ``scale`` key), instead of alpha / rank."""

    def check(self, shape: torch.Size) -> None:
        """ValueError when the delta can't have ``shape`` (a LoRA for another model)."""
        cols = self.down[0].numel() if self.mid is None else self.down.shape[1] * self.mid[0, 0].numel()
        if self.up.shape[0] != shape[0] or self.up.shape[0] * cols != shape.numel() or (
                self.mid is None and self.up[0].numel() != self.down.shape[0]):
            raise ValueError(f"{self.target}: down {list(self.down.shape)}, up {list(self.up.shape)} "
                             f"can't make the layer's {list(shape)}")

    def delta(self, shape: torch.Size, dyn: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """The fp32 delta for a weight of ``shape`` (A1111's ``calc_updown`` + ``finalize_updown``
        without the multiplier): scale = alpha / rank (rank: down's rows, before ``dyn`` keeps
        fewer), 1 without alpha."""
        down, up = self.down.to(device or "cpu", torch.float32), self.up.to(device or "cpu", torch.float32)
        rank = down.shape[0]
        scale = self.scale if self.scale is not None else (self.alpha / rank if self.alpha is not None else 1.0)
        if dyn is not None:
            up, down = up[:, :dyn], down[:dyn]
        if self.mid is not None:  # Tucker: mid (r, r, kh, kw) between a 1x1 up and down
            d = torch.einsum("nmkl,in,mj->ijkl", self.mid.to(up.device, torch.float32), up.flatten(1), down.flatten(1))
        else:
            d = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        if d.numel() != shape.numel():
            raise ValueError(f"{self.target}: the LoRA's delta is {list(d.shape)}, the layer is {list(shape)}")
        return d.reshape(shape) * scale


@dataclass
class LoraFile:
    name: str
    """The file's name without its extension: what ``<lora:NAME>`` refers to."""
    path: Path
    hash: str
    """A1111's short hash (12 hex digits): the safetensors' ``sshs_model_hash`` metadata, else the
    sha256 of its tensor data (after the header: kohya's and civitai's "AutoV3"), else (.pt) the
    whole file's sha256."""
    modules: dict[str, LoraModule] = field(default_factory=dict)
    """By target layer name."""
    unmatched: list[str] = field(default_factory=list)
    """Module keys of the file that map to no layer."""
    unsupported: list[str] = field(default_factory=list)
    """Module keys of a kind sdterm doesn't apply (LoHa, LoKr, IA3, DoRA...)."""

    @property
    def has_text(self) -> bool:
        return any(m.model == "text" for m in self.modules.values())

    @property
    def has_unet(self) -> bool:
        return any(m.model == "unet" for m in self.modules.values())

    def notes(self) -> list[str]:
        """One line per part of the file that isn't used."""
        out = []
        if self.unmatched:
            out.append(f"LoRA {self.name}: {len(self.unmatched)} of its layers match none of this model's "
                       f"(e.g. {self.unmatched[0]}); used without them")
        if self.unsupported:
            out.append(f"LoRA {self.name}: {len(self.unsupported)} layers of a kind sdterm doesn't apply "
                       f"(e.g. {self.unsupported[0]}); used without them")
        return out


# ---- the key table ------------------------------------------------------------------------------

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm(name: str, n: int) -> list[str]:
    """Candidate LDM names (``_`` for ``.``) of a diffusers-style U-Net module name (``_`` for
    ``.``), for ``n`` res blocks per level; [] when it is no diffusers name."""
    m = re.fullmatch(r"conv_in(.*)", name)
    if m:
        return [f"input_blocks_0_0{m[1]}"]
    m = re.fullmatch(r"conv_out(.*)", name)
    if m:
        return [f"out_2{m[1]}"]
    m = re.fullmatch(r"time_embedding_linear_(\d+)(.*)", name)
    if m:
        return [f"time_embed_{int(m[1]) * 2 - 2}{m[2]}"]
    m = re.fullmatch(r"(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        i, j, rest = int(m[2]), int(m[4]), m[5]
        block = 1 + (n + 1) * i + j if m[1] == "down" else (n + 1) * i + j
        where = "input_blocks" if m[1] == "down" else "output_blocks"
        if m[3] == "resnets":
            return [f"{where}_{block}_0_{_RESNET.get(rest, rest)}"]
        return [f"{where}_{block}_1_{rest}"]
    m = re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        if m[1] == "attentions":
            return [f"middle_block_1_{m[3]}"]
        return [f"middle_block_{int(m[2]) * 2}_{_RESNET.get(m[3], m[3])}"]
    m = re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return [f"input_blocks_{(n + 1) * (int(m[1]) + 1)}_0_op"]
    m = re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:
        block = (n + 1) * int(m[1]) + n
        return [f"output_blocks_{block}_2_conv", f"output_blocks_{block}_1_conv"]
    return []


_OLD_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_TEXT = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}

# (suffix, part) for every spelling of a part, longest first
_PARTS = [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
          (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
          (".lora.up.weight", "up"), (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"),
          (".scale", "scale")]


def _split(key: str) -> tuple[str, str | None]:
    """(module key, part) of a file key; part None for a kind sdterm doesn't apply."""
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key.rsplit(".", 1)[0] if "." in key else key, None


class Targets:
    """A model's layers that a LoRA can change (Linear and Conv2d weights), by their name with
    ``_`` for ``.``, and their weights' shapes; from the architecture alone (no weights read, no
    transformers import)."""

    def __init__(self, cfg):
        from ..networks.clip import text_encoder_shapes
        from ..networks.unet import UNetModel

        self.n = cfg.unet.num_res_blocks
        self.shapes: dict[str, torch.Size] = {}
        with torch.device("meta"):
            unet = UNetModel(cfg.unet)
        for name, m in unet.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                self.shapes[name] = m.weight.shape
        self.unet = {name.replace(".", "_"): name for name in self.shapes}
        self.text = {}
        for key, shape in text_encoder_shapes(cfg.text).items():
            if key.endswith(".weight") and len(shape) == 2 and "embedding" not in key:
                name = "text_model." + key.removeprefix("text_model.").removesuffix(".weight")
                self.shapes[name] = torch.Size(shape)
                self.text[name.replace(".", "_")] = name

    def _unet(self, rest: str) -> tuple[str, str] | None:
        """A U-Net module name with ``_`` (diffusers' or the original LDM one) -> its layer."""
        for cand in [*diffusers_to_ldm(rest, self.n), rest]:
            if cand in self.unet:
                return "unet", self.unet[cand]
        return None

    def resolve(self, module_key: str) -> tuple[str, str] | None:
        """(model, target layer name) of a file's module key, or None."""
        k = module_key
        if k.startswith("lora_unet_"):
            return self._unet(k[len("lora_unet_"):])
        for prefix in ("lora_te_", "lora_te1_"):
            if k.startswith(prefix):
                cand = k[len(prefix):]
                return ("text", self.text[cand]) if cand in self.text else None
        if k.startswith("unet."):
            path = k[len("unet."):]
            for old, new in _OLD_UNET.items():
                path = path.replace(f"processor.{old}", new)
            return self._unet(path.replace(".", "_"))
        if k.startswith("text_encoder."):
            path = k[len("text_encoder."):]
            for old, new in _OLD_TEXT.items():
                path = path.replace(f"self_attn.{old}", f"self_attn.{new}")
            path = path.replace(".lora_linear_layer", "")
            if not path.startswith("text_model."):
                path = "text_model." + path
            cand = path.replace(".", "_")
            return ("text", self.text[cand]) if cand in self.text else None
        return None


# ---- reading ------------------------------------------------------------------------------------

def read_lora(path: Path, targets: Targets) -> LoraFile:
    """The LoRA at ``path`` mapped onto ``targets``; :class:`LoraError` (one line) when it can't be
    used: unreadable, unsafe, another architecture, no layer of it matches."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LoraError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise LoraError(f"{path}: {size / 2**30:.1f} GB is a model, not a LoRA")
    try:
        kind = sniff_format(path)
        data = path.read_bytes()
    except OSError as exc:
        raise LoraError(f"{path}: cannot read ({exc.strerror or exc})") from None
    alphas: dict[str, float] = {}
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(data, path)
        short = metadata.get("sshs_model_hash") or _addnet_hash(data)
        alphas = _peft_alphas(metadata)
    elif kind in ("zip", "pickle"):
        tensors = _read_pickle(data, path)
        short = hashlib.sha256(data).hexdigest()
    else:
        raise LoraError(f"{path}: not a LoRA (neither safetensors nor a PyTorch .pt/.ckpt)")
    if any(k.startswith(("lora_te2_", "lora_te1_text_model_encoder_layers_23")) for k in tensors):
        raise LoraError(f"{path}: an SDXL LoRA (it has a second text encoder); this model is Stable Diffusion v1")
    out = LoraFile(path.stem, path, short[:12].lower())
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_key, part = _split(key)
        if part is None:
            out.unsupported.append(key)
            continue
        by_module.setdefault(module_key, {})[part] = value
    for module_key, parts in by_module.items():
        found = targets.resolve(module_key)
        if found is None:
            out.unmatched.append(module_key)
            continue
        if "down" not in parts or "up" not in parts:
            out.unsupported.append(module_key)
            continue
        model, target = found
        alpha = parts.get("alpha")
        if alpha is None and module_key in alphas:
            alpha = alphas[module_key]
        mod = LoraModule(target, model, parts["down"], parts["up"], parts.get("mid"),
                         None if alpha is None else float(alpha), None if "scale" not in parts else float(parts["scale"]))
        try:
            mod.check(targets.shapes[target])
        except (ValueError, RuntimeError, IndexError) as exc:
            raise LoraError(f"{path}: made for another model ({first_line(exc)})") from None
        out.modules[target] = mod
    if not out.modules:
        what = f"none of its {len(by_module)} layers" if by_module else "no LoRA layers"
        raise LoraError(f"{path}: {what} match a Stable Diffusion v1 model (is it for SDXL or SD 2.x?)")
    return out


def _read_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
        (n,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, the file is unusable
        raise LoraError(f"{path}: not a readable safetensors file ({first_line(exc)}); is it truncated?") from None
    return tensors, {k: v for k, v in metadata.items() if isinstance(v, str)}


def _read_pickle(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    import io

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refusals and damage alike become one line
        reason = unsafe_pickle_reason(exc)
        if reason:
            raise LoraError(f"{path}: refused to load: {reason}; use a .safetensors version of this LoRA") from None
        raise LoraError(f"{path}: not a readable LoRA ({first_line(exc)}); is it truncated?") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraError(f"{path}: holds a {type(obj).__name__}, not a LoRA")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _addnet_hash(data: bytes) -> str:
    """sha256 of a safetensors file's tensor data (after the 8-byte length and the JSON header)."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


def _peft_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """Module key -> alpha from diffusers' ``lora_adapter_metadata`` (PEFT's LoraConfig per
    component: ``lora_alpha`` and ``alpha_pattern``), for the keys of that component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, float] = {}
    for component, config in meta.items() if isinstance(meta, dict) else ():
        if not isinstance(config, dict):
            continue
        prefix = component.split(".")[0]
        default = config.get("lora_alpha")
        out[f"{prefix}.*"] = default
        for pattern, alpha in (config.get("alpha_pattern") or {}).items():
            out[f"{prefix}.{pattern}"] = alpha
    return _Alphas(out)


class _Alphas(dict):
    """Looks a module key up by component default and alpha_pattern suffixes."""

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def __getitem__(self, key: str) -> float:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key, default=None):
        if not isinstance(key, str):
            return default
        prefix = key.split(".")[0]
        best = None
        for pattern, alpha in self.items():
            p_prefix, _, p_rest = pattern.partition(".")
            if p_prefix == prefix and p_rest != "*" and (key.endswith("." + p_rest) or key == f"{prefix}.{p_rest}"):
                best = alpha
        if best is None:
            best = dict.get(self, f"{prefix}.*")
        return default if best is None else float(best)
