"""TAESD's decoder (Ollin Boer Bohan's tiny autoencoder for SD v1/v2, github.com/madebyollin/taesd):
the SD latent (as the sampler sees it, scale factor 1) to an RGB image in about [0, 1], for live
previews at the image's size. About 1.2 M parameters; a 512x512 decode is a few milliseconds on a
GPU.

The module has the original ``taesd_decoder`` file's layout and key names: one ``nn.Sequential``
(0: the clamp tanh(x / 3) * 3, 1: a 3x3 conv from 4 to 64 channels, then three groups of three
residual blocks each followed by a nearest 2x upsample and a bias-free conv, one more block, and a
3x3 conv to RGB), a block being ``conv`` (conv, ReLU, conv, ReLU, conv), an identity skip and a
ReLU. diffusers' ``AutoencoderTiny`` stores the same tensors as ``decoder.layers.N`` with N one
lower (it has no module for the clamp): :func:`load_taesd` reads either file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CHANNELS = 64
LATENT_CHANNELS = 4


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n: int = CHANNELS):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(n, n, 3, padding=1), nn.ReLU(), nn.Conv2d(n, n, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(n, n, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDDecoder(nn.Sequential):
    def __init__(self):
        layers: list[nn.Module] = [Clamp(), nn.Conv2d(LATENT_CHANNELS, CHANNELS, 3, padding=1), nn.ReLU()]
        for _ in range(3):
            layers += [Block(), Block(), Block(), nn.Upsample(scale_factor=2),
                       nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False)]
        layers += [Block(), nn.Conv2d(CHANNELS, 3, 3, padding=1)]
        super().__init__(*layers)


class TAESDError(ValueError):
    """A file that is not TAESD's decoder; str() is one line naming the file and what to do."""


def taesd_bytes(width: int, height: int, itemsize: int = 2) -> int:
    """Device bytes a decode at ``width`` x ``height`` pixels needs beside the latent: the weights
    and, at the full size, the upsample's output, a block's input, two conv outputs in flight and
    the RGB result (an upper bound, measured loosely on an H200: 512x512 fp16 peaks near 130 MiB)."""
    weights = 1_300_000 * itemsize
    return weights + 5 * width * height * CHANNELS * itemsize


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The decoder's tensors from ``path`` (original or diffusers names), under the original names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise TAESDError(f"TAESD file {path}: can't be read ({exc}); run `sdterm download taesd` again") from None
    if any(k.startswith("decoder.layers.") for k in raw):  # diffusers' AutoencoderTiny
        out = {}
        for key, value in raw.items():
            if key.startswith("decoder.layers."):
                index, rest = key.removeprefix("decoder.layers.").split(".", 1)
                out[f"{int(index) + 1}.{rest}"] = value
        return out
    return raw


def load_taesd(path: Path) -> TAESDDecoder:
    """TAESD's decoder from a ``.safetensors`` file (``taesd_decoder.safetensors`` or diffusers'
    ``diffusion_pytorch_model.safetensors``), fp32 on the host; TAESDError (one line) for a file
    whose tensors don't fit it (the SDXL or SD3 TAESD, another model)."""
    state = read_state_dict(Path(path))
    model = TAESDDecoder()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}"
        raise TAESDError(f"TAESD file {path}: not SD v1 TAESD's decoder ({what}); "
                         "use madebyollin/taesd (the taesdxl/taesd3 files are for other models)")
    model.load_state_dict({k: state[k].float() for k in expected}, strict=True)
    return model.eval().requires_grad_(False)
