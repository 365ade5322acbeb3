"""The CLIP text encoder (transformers' CLIPTextModel) under the checkpoint's own key names:
built and verified by name and shape (the model cache loads it: ``loading/host_units.py``;
``prompt/conditioning.py`` runs it a chunk at a time).

transformers is imported only where the encoder is built (a cache miss): it costs seconds."""

from __future__ import annotations

import torch

from ...config import TextConfig
from ..loading.checkpoint import TEXT_PREFIX, Checkpoint, match_shapes


def clip_config(cfg: TextConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.hidden_act,
        projection_dim=cfg.hidden_size,
        # CLIP's vocabularies end with <|startoftext|>, <|endoftext|> (49406, 49407 for ViT-L/14).
        bos_token_id=cfg.vocab_size - 2,
        eos_token_id=cfg.vocab_size - 1,
        pad_token_id=cfg.vocab_size - 1,
    )


def text_model(cfg: TextConfig):
    """transformers' CLIPTextModel for ``cfg`` (SDPA attention), initialised where it is made:
    under ``torch.device("meta")`` it holds no memory (the model cache builds it so, then points
    its tensors into the units' host buffers)."""
    from transformers import CLIPTextModel

    config = clip_config(cfg)
    config._attn_implementation = "sdpa"
    return CLIPTextModel(config)


def build_text_encoder(cfg: TextConfig, dtype: torch.dtype):
    """The text encoder with random weights (measurements and the demo model, without a checkpoint)."""
    return text_model(cfg).to(dtype).eval().requires_grad_(False)


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
