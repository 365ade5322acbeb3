"""The tiny demo model (same architecture, random weights) and full-size random-weight modules.

``write_demo_model(dir)`` writes ``model.safetensors`` (``demo_modules``: random weights made
sensitive enough for pixel tests, see ``DEMO_GAINS``) in the original single-file key layout,
plus the VAE encoder (``demo_encoder``, drawn last from a seed of its own),
``config.yaml`` and ``tokenizer/`` (a small byte-level BPE vocabulary in CLIP's format),
so the demo goes through exactly the loading code a real checkpoint does.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ...config import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig, model_config_to_dict
from ...fsutil import atomic_write_bytes
from ..networks.unet import UNetModel
from ..networks.vae import VAEDecoder, VAEEncoder
from ..prompt.tokenizer import bytes_to_unicode
from .checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# A small corpus for the demo tokenizer's merges: enough to make common words single tokens.
_CORPUS = """a photo of a red fox in the snow, a painting of a castle on a hill at sunset,
portrait of an old man with a beard, highly detailed digital art, trending on artstation,
a cat sitting on a chair by the window, landscape with mountains and a lake, city street at night
with neon lights, the moon over the sea, a bowl of fruit, oil painting, watercolor, sharp focus"""


def demo_vocab(n_merges: int = 120) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: 256 byte symbols, the same with ``</w>``, learned merges, specials."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    words = Counter(_CORPUS.lower().replace(",", " ").split())
    byte_map = bytes_to_unicode()
    split = {w: [byte_map[b] for b in w.encode()] for w in words}
    for w in split:
        split[w][-1] += "</w>"
    merges: list[str] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, parts in split.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        vocab_list.append(a + b)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_tokenizer(folder: Path) -> int:
    """Write vocab.json + merges.txt; returns the vocabulary size."""
    vocab, merges = demo_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    atomic_write_bytes(folder / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    return len(vocab)


def demo_config(vocab_size: int) -> ModelConfig:
    """Tiny, but every part of the SD v1 structure is there: levels with and without attention,
    the middle transformer, skip connections, 8x VAE upsampling, a CLIP encoder."""
    return ModelConfig(
        name="sdterm-demo",
        demo=True,
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(1,),
            num_heads=2,
            transformer_depth=1,
            context_dim=32,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
        text=TextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=77
        ),
        schedule=ScheduleConfig(),
    )


def _random_init(cfg: ModelConfig, dtype: torch.dtype, seed: int):
    """(text encoder, U-Net, VAE decoder) with PyTorch's/transformers' default random init."""
    from ..networks.clip import build_text_encoder

    torch.manual_seed(seed)
    text = build_text_encoder(cfg.text, dtype)
    unet = UNetModel(cfg.unet).to(dtype).eval().requires_grad_(False)
    vae = VAEDecoder(cfg.vae).to(dtype).eval().requires_grad_(False)
    return text, unet, vae


def random_modules(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(text encoder, U-Net, VAE decoder) with random weights; full size with ModelConfig()."""
    text, unet, vae = _random_init(cfg, dtype, seed)
    # Random weights give the U-Net's zero-initialised-in-training layers real values; scale the
    # output convs down so that sampling stays in a sane range, as a trained model does.
    with torch.no_grad():
        unet.out[2].weight.mul_(0.1)
    return text, unet, vae


DEMO_GAINS = {
    "token_embedding": 30.0,
    "cross_attention_qk": 4.0,
    "cross_attention_v": 2.0,
    "unet_out": 3.0,
    "vae_out": 1.5,
}
DEMO_FINAL_NORM = {"weight_std": 0.3, "bias_mean": 0.5, "bias_std": 0.5}
"""The demo text encoder's final layer norm: weight 1 + N(0, 0.3), bias N(0.5, 0.5) per channel
(drawn from their own generator, so every other demo weight is unchanged). transformers' init
makes it an identity (weight 1, bias 0), whose output has mean ~0 over every token; A1111's
emphasis restores the chunk's mean by multiplying with original_mean / new_mean, which is then
~0 / ~0. A trained CLIP's final norm has a non-trivial weight and bias, so its chunk means are
far from 0 (and they depend on the text): so are the demo's."""
"""Factors on the default random init that make the demo model *sensitive*, so that tests
comparing its pixels notice real errors. With the plain init the model is nearly blind: the
noise estimate is tiny next to x_T (removing the U-Net moved pixels by under 10/255), the
cross-attention is almost uniform over the 77 tokens and the token embeddings (std 0.02) are
no larger than the position embeddings (one changed prompt character moved pixels by 2/255).

- ``token_embedding``: token embeddings of std ~0.6, so the token ids, not the positions, drive
  the text encoder (its final layer norm keeps the output at unit scale whatever this is);
- ``cross_attention_qk``: every ``attn2``'s to_q and to_k, so the attention logits have std ~5
  instead of ~0.3: each pixel attends to a few tokens, not to their average;
- ``cross_attention_v``: every ``attn2``'s to_v, so the text's contribution is not lost in the
  residual stream;
- ``unet_out``: the U-Net's output conv, so the noise estimate has unit std like a trained
  model's (it follows a GroupNorm, so it stays O(1) whatever the latent's size);
- ``vae_out``: the decoder's output conv, so the image spans the pixel range (std ~60/255, a few
  percent of the values clipped) instead of a washed-out grey.

Every scaled layer reads the output of a normalisation (layer norm, group norm) or a softmax,
so the activations stay bounded whatever the latents' size: the U-Net's output peaks at ~5 over
a 20-step render at cfg 7.5. Measured in fp16 on an H100, the largest activation is ~60 in the
U-Net and ~420 in the VAE at 512x512, cfg 7.5 (~220 and ~1250 at cfg 50), far below fp16's
65504, and the fp16 image is within 3/255 of the fp32 one. tests/test_demo_sensitivity.py holds
the sensitivity and finiteness. Only the demo gets these gains: ``random_modules`` (and the
engine's full-size random weights) keep the plain init.
"""


def demo_modules(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(text encoder, U-Net, VAE decoder) with the demo model's random weights: the default init
    with :data:`DEMO_GAINS` applied and the text encoder's final layer norm of
    :data:`DEMO_FINAL_NORM`."""
    from ..networks.attention import CrossAttention
    from ..networks.clip import clip_inner

    text, unet, vae = _random_init(cfg, dtype, seed)
    g = DEMO_GAINS
    with torch.no_grad():
        inner = clip_inner(text)
        inner.embeddings.token_embedding.weight.mul_(g["token_embedding"])
        norm, f = inner.final_layer_norm, DEMO_FINAL_NORM
        gen = torch.Generator().manual_seed(10_000 + seed)
        norm.weight.copy_(1 + f["weight_std"] * torch.randn(norm.weight.shape, generator=gen))
        norm.bias.copy_(f["bias_mean"] + f["bias_std"] * torch.randn(norm.bias.shape, generator=gen))
        for name, module in unet.named_modules():
            if isinstance(module, CrossAttention) and name.endswith("attn2"):
                module.to_q.weight.mul_(g["cross_attention_qk"])
                module.to_k.weight.mul_(g["cross_attention_qk"])
                module.to_v.weight.mul_(g["cross_attention_v"])
        unet.out[2].weight.mul_(g["unet_out"])
        vae.decoder.conv_out.weight.mul_(g["vae_out"])
    return text, unet, vae


DEMO_ENCODER_SEED = 20_000
"""The demo encoder's weights come from torch's default init under seed ``DEMO_ENCODER_SEED +
seed``, drawn after every other demo weight with the global RNG state saved and restored, so
adding the encoder left every other demo tensor bit-identical (tests pin the demo's pixels)."""


def demo_encoder(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> VAEEncoder:
    """The demo model's VAE encoder (``encoder.*``, ``quant_conv.*``): the plain default init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_ENCODER_SEED + seed)
        return VAEEncoder(cfg.vae).to(dtype).eval().requires_grad_(False)


def original_state_dict(text, unet, vae, encoder: VAEEncoder | None = None) -> dict[str, torch.Tensor]:
    """The modules' weights under the original single-file checkpoint keys (the VAE encoder's
    only when one is given)."""
    from ..networks.clip import clip_inner

    sd: dict[str, torch.Tensor] = {}
    modules = [(UNET_PREFIX, unet), (VAE_PREFIX, vae), (TEXT_PREFIX + "text_model.", clip_inner(text))]
    if encoder is not None:
        modules.append((VAE_PREFIX, encoder))
    for prefix, module in modules:
        for k, v in module.state_dict().items():
            if k.endswith("position_ids"):
                continue
            sd[prefix + k] = v.detach().contiguous()
    return sd


def write_demo_model(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo model folder; returns its path."""
    from omegaconf import OmegaConf
    from safetensors.torch import save

    folder = Path(folder)
    vocab_size = write_tokenizer(folder / "tokenizer")
    cfg = demo_config(vocab_size)
    text, unet, vae = demo_modules(cfg, torch.float32, seed)
    sd = original_state_dict(text, unet, vae, demo_encoder(cfg, torch.float32, seed))
    data = save(sd, metadata={"sdterm_demo": "random weights; images are noise"})
    atomic_write_bytes(folder / "model.safetensors", data)
    yaml = "# sdterm demo model: tiny SD v1 architecture, random weights (images are noise)\n"
    yaml += OmegaConf.to_yaml(OmegaConf.create(model_config_to_dict(cfg)))
    atomic_write_bytes(folder / "config.yaml", yaml.encode())
    return folder
