"""The CLIP text encoder of SD v1 under the checkpoint's own key names: our own module (no
transformers import on any render: in a py-spy profile of a first use on an H100, 2026-11-27,
building CLIPTextModel took 8.35 s of the 8.78 s text load, nearly all of it transformers'
import), the same computation as transformers' CLIPTextModel with its module tree,
names and registration order (tests/test_clip.py holds it to CLIPTextModel, output and layout).
Built and verified by name and shape (the model cache loads it: ``loading/host_units.py``);
``prompt/conditioning.py`` runs it a chunk at a time.

transformers is imported only to draw random weights with its initialisation (the demo model and
the bench's checkpoints), so those stay what they were."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TextConfig
from ..loading.checkpoint import TEXT_PREFIX, Checkpoint, match_shapes

LAYER_NORM_EPS = 1e-5
"""CLIP's (transformers' ``layer_norm_eps`` default, what SD v1's encoder was trained with)."""


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x) (SD v1's text encoder)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class TextEmbeddings(nn.Module):
    """Token + position embeddings. Their tables are made uninitialised (every encoder gets its
    weights loaded): drawing normal values on the meta device imports torch's Python reference
    ops (and sympy), 2.3 s of a first use on a 2-core box (2026-11-27)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, h, _weight=torch.empty(cfg.vocab_size, h))
        self.position_embedding = nn.Embedding(cfg.max_positions, h, _weight=torch.empty(cfg.max_positions, h))
        # On the host even in a meta model (the model cache lays it out anew): arange on the meta
        # device goes through a decomposition that imports sympy, 0.8 s.
        self.register_buffer("position_ids", torch.arange(cfg.max_positions, device="cpu").expand((1, -1)),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[-1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention (projections registered k, v, q, out as transformers does:
    the model cache's layout follows registration order)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.scale = (h // cfg.num_heads) ** -0.5
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.q_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text encoder activation {cfg.hidden_act!r}: one of {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))


@dataclass
class TextEncoderOutput:
    last_hidden_state: torch.Tensor
    """The last layer's output through the final layer norm, (batch, tokens, hidden)."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """With ``output_hidden_states``: the embeddings' output, then each layer's (before the final
    layer norm), as transformers gives them (clip skip N takes ``hidden_states[-N]``)."""


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer: token + position embeddings, pre-norm causal encoder layers, a
    final layer norm. Called as transformers' CLIPTextModel is: ``model(input_ids=...,
    output_hidden_states=...)``."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> TextEncoderOutput:
        x = self.embeddings(input_ids)
        hidden = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            hidden.append(x)
        return TextEncoderOutput(self.final_layer_norm(x), tuple(hidden) if output_hidden_states else None)


def clip_config(cfg: TextConfig):
    """transformers' CLIPTextConfig for ``cfg`` (random weights and the bench's reference only)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=LAYER_NORM_EPS,
        projection_dim=cfg.hidden_size,
        # CLIP's vocabularies end with <|startoftext|>, <|endoftext|> (49406, 49407 for ViT-L/14).
        bos_token_id=cfg.vocab_size - 2,
        eos_token_id=cfg.vocab_size - 1,
        pad_token_id=cfg.vocab_size - 1,
    )


def reference_text_model(cfg: TextConfig):
    """transformers' CLIPTextModel for ``cfg`` (SDPA attention), randomly initialised as
    transformers initialises it: the reference the tests and the bench hold ours to."""
    from transformers import CLIPTextModel

    config = clip_config(cfg)
    config._attn_implementation = "sdpa"
    return CLIPTextModel(config)


def text_model(cfg: TextConfig) -> CLIPTextEncoder:
    """The text encoder for ``cfg``, initialised where it is made: under ``torch.device("meta")``
    it holds no memory (the model cache builds it so, then points its tensors into the units'
    host buffers)."""
    return CLIPTextEncoder(cfg)


def build_text_encoder(cfg: TextConfig, dtype: torch.dtype) -> CLIPTextEncoder:
    """The text encoder with random weights drawn as transformers draws CLIPTextModel's (the demo
    model and measurements, without a checkpoint)."""
    drawn = clip_inner(reference_text_model(cfg)).state_dict()
    with torch.device("meta"):  # made without drawing: the generator is left as transformers left it
        model = text_model(cfg)
    model.load_state_dict(drawn, assign=True)  # (position_ids is made on the host even on meta)
    return model.to(dtype).eval().requires_grad_(False)


def clip_inner(model) -> torch.nn.Module:
    """The module holding embeddings/encoder/final_layer_norm (transformers 4 nests it as text_model)."""
    return getattr(model, "text_model", model)


def clip_prefix(keys: list[str]) -> str:
    """The checkpoint prefix of the text model's tensors: SD v1 files store
    cond_stage_model.transformer.text_model.*; a few older ones lack "text_model."."""
    nested = TEXT_PREFIX + "text_model."
    return nested if any(k.startswith(nested) for k in keys) else TEXT_PREFIX


def text_encoder_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """The CLIP text model's tensors (names under ``text_model.``) and shapes, from the config
    alone: checking a checkpoint and sizing the encoder need no transformers import
    (tests/test_startup.py holds this table to CLIPTextModel's own)."""
    h, inner = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.token_embedding.weight": (cfg.vocab_size, h),
        "embeddings.position_embedding.weight": (cfg.max_positions, h),
    }
    for i in range(cfg.num_layers):
        layer = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (h, h)
            shapes[f"{layer}self_attn.{proj}.bias"] = (h,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}{norm}.weight"] = (h,)
            shapes[f"{layer}{norm}.bias"] = (h,)
        shapes[f"{layer}mlp.fc1.weight"] = (inner, h)
        shapes[f"{layer}mlp.fc1.bias"] = (inner,)
        shapes[f"{layer}mlp.fc2.weight"] = (h, inner)
        shapes[f"{layer}mlp.fc2.bias"] = (h,)
    shapes["final_layer_norm.weight"] = (h,)
    shapes["final_layer_norm.bias"] = (h,)
    return shapes


def verify_text_encoder(cfg: TextConfig, ckpt: Checkpoint) -> None:
    """Check the checkpoint has every text-encoder tensor, without reading any (or importing
    transformers: this runs for every model opened, cache hit or not)."""
    match_shapes(text_encoder_shapes(cfg), ckpt, clip_prefix(ckpt.keys()))
