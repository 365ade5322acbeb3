"""Textual-inversion embeddings in AUTOMATIC1111's formats, read as safely as checkpoints.

A file's name (without its extension) is the trigger word: ``easynegative.safetensors`` is used
wherever a prompt says ``easynegative``. Formats (by content, not by extension):

* A1111 ``.pt``: a pickle of ``{"string_to_param": {"*": tensor(n, 768)}, "name": ..., "step":
  ..., ...}``; also the older files whose ``string_to_param`` is a ``torch.nn.ParameterDict``.
* ``.safetensors`` with one tensor, usually ``emb_params`` (kohya's sd-scripts), shape (n, 768).
* diffusers' ``learned_embeds.bin``/``.safetensors``: a dict of one tensor, ``{"<token>": (768,)}``.

Pickles go through the same restricted unpickler as checkpoints (torch's ``weights_only``
loader; refusals are worded by :mod:`sdterm.engine.loading.checkpoint`), with one extra class
allowed: ``torch.nn.ParameterDict``, whose state is only tensors and plain containers. A file
that would run code is refused, and its code never runs.

The hash is A1111's: the file's sha256; ``TI hashes:`` shows 12 hex digits (:func:`ti_hashes`).

Folders of them (scanned, indexed by trigger word, their problems collected) are
:mod:`.embedding_db`.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading.checkpoint import CheckpointError, first_line, sniff_format, unsafe_pickle_reason

MAX_VECTORS = 75
"""One prompt chunk: A1111 never splits an embedding across chunks, so a longer one can't be used."""
MAX_FILE_BYTES = 64 * 2**20
"""Real embeddings are kilobytes (75 vectors of 768 float32s are 230 KB); a bigger file is
something else (a LoRA or a model) and is refused before it is read."""

_PICKLE_LOCK = threading.Lock()  # torch's extra-safe-globals list is process-wide


class EmbeddingError(CheckpointError):
    """An embedding file can't be used; ``str(exc)`` is one line naming the file and the reason."""


@dataclass(frozen=True, eq=False)
class TextualInversion:
    """One embedding: its trigger word, vectors and identity."""

    name: str
    """The trigger word: the file's name without its extension."""
    path: Path
    vectors: torch.Tensor
    """float32, shape (n_vectors, width), on the CPU."""
    sha256: str
    """sha256 of the whole file (64 hex digits)."""
    format: str
    """What the file held: ``"string_to_param"`` (A1111), ``"emb_params"`` (kohya) or
    ``"diffusers"`` (a dict of one tensor, keyed by the concept's token)."""
    container: str
    """``"pickle"`` (.pt/.bin written by torch.save) or ``"safetensors"``."""
    step: int | None = None
    """Training step, where the file says (A1111 .pt)."""
    trained_on: str | None = None
    """``sd_checkpoint_name``, where the file says (A1111 .pt)."""

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def hash(self) -> str:
        """As A1111 writes it in ``TI hashes:`` (its ``shorthash``): the sha256's first 12 hex digits."""
        return self.sha256[:12]

    @property
    def infotext_name(self) -> str:
        """The name as A1111 writes it in ``TI hashes:`` (``:`` and ``,`` removed)."""
        return self.name.replace(":", "").replace(",", "")

    def __repr__(self) -> str:
        return (f"TextualInversion({self.name!r}, {self.n_vectors}x{self.width}, {self.format}/"
                f"{self.container}, hash={self.hash})")


def ti_hashes(embeddings: Iterable[TextualInversion]) -> str:
    """The value of A1111's ``TI hashes:`` field for the embeddings one text encoding used, in
    order of first use: ``"name: 0123456789ab, other: ..."``; each name once.

    (A1111 encodes the negative prompt first, then the prompt, and each encoding puts its own
    list *before* the one already there; a caller that wants that exact text joins the prompt's
    value and the negative prompt's value with ``", "`` in that order, as A1111 does.)
    """
    seen: dict[str, str] = {}
    for emb in embeddings:
        seen.setdefault(emb.name, f"{emb.infotext_name}: {emb.hash}")
    return ", ".join(seen.values())


# --------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------


def load_embedding(path: str | os.PathLike, width: int = 768) -> TextualInversion:
    """Read one embedding file whose vectors must be ``width`` wide (768: SD v1's CLIP ViT-L).

    Never runs code from the file. Raises :class:`EmbeddingError` (one line, naming the file)
    when the file is unreadable, unsafe, not an embedding, or made for another model.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise EmbeddingError(f"{p}: not a file")
    except OSError as exc:
        raise EmbeddingError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if size == 0:
        raise EmbeddingError(f"{p}: the file is empty")
    if size > MAX_FILE_BYTES:
        raise EmbeddingError(
            f"{p}: {size / 2**20:.0f} MB is far too large for a textual-inversion embedding "
            "(is it a LoRA or a model?)"
        )
    try:
        kind = sniff_format(p)
        data = p.read_bytes()
    except OSError as exc:
        raise EmbeddingError(f"{p}: cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()

    if kind == "safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            obj: object = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - whatever the parser says, the file is unusable
            raise EmbeddingError(f"{p}: not a readable safetensors file ({first_line(exc)}); is it truncated?") from None
        container = "safetensors"
    elif kind in ("zip", "pickle"):
        if kind == "zip":
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    z.namelist()
            except zipfile.BadZipFile:
                raise EmbeddingError(f"{p}: the archive is damaged or truncated") from None
        obj = _restricted_torch_load(data, p)
        container = "pickle"
    else:
        raise EmbeddingError(f"{p}: not an embedding (neither safetensors nor a PyTorch .pt/.bin)")

    tensor, fmt = _the_tensor(obj, p, width)
    vectors = _check_vectors(tensor, p, width)
    meta = obj if isinstance(obj, dict) else {}
    step = meta.get("step")
    trained_on = meta.get("sd_checkpoint_name")
    return TextualInversion(
        name=p.stem,
        path=p,
        vectors=vectors,
        sha256=digest,
        format=fmt,
        container=container,
        step=step if isinstance(step, int) and not isinstance(step, bool) else None,
        trained_on=trained_on if isinstance(trained_on, str) else None,
    )


def _restricted_torch_load(data: bytes, p: Path) -> object:
    """torch.load through the weights-only unpickler (as checkpoints are read), plus the one
    container class old A1111/original-textual-inversion files pickled: ParameterDict."""
    from torch.nn import ParameterDict

    try:
        with _PICKLE_LOCK, torch.serialization.safe_globals([ParameterDict]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refusals and damage alike become one line
        reason = unsafe_pickle_reason(exc)
        if reason:
            raise EmbeddingError(
                f"{p}: refused to load: {reason}; only tensors and plain containers are accepted "
                "(use a .safetensors version of this embedding)"
            ) from None
        raise EmbeddingError(f"{p}: not a readable embedding ({first_line(exc)}); is it truncated?") from None


def _the_tensor(obj: object, p: Path, width: int) -> tuple[torch.Tensor, str]:
    """The file's one embedding tensor and the layout it was found in."""
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{p}: holds a {type(obj).__name__}, not an embedding")

    if "string_to_param" in obj:  # A1111 / original textual inversion
        params = obj["string_to_param"]
        if isinstance(params, torch.nn.ParameterDict):  # files from torch 1.11 and before
            params = params.__dict__.get("_parameters")
        if not isinstance(params, dict):
            raise EmbeddingError(f"{p}: its string_to_param is a {type(params).__name__}, not a dict of tensors")
        if len(params) != 1:
            raise EmbeddingError(f"{p}: its string_to_param holds {len(params)} terms; an embedding file has one")
        tensor = next(iter(params.values()))
        if not isinstance(tensor, torch.Tensor):
            raise EmbeddingError(f"{p}: its string_to_param holds a {type(tensor).__name__}, not a tensor")
        return tensor, "string_to_param"

    if "clip_l" in obj or "clip_g" in obj:  # SDXL: one tensor per text encoder
        shapes = ", ".join(
            f"{k} {list(obj[k].shape)}" for k in ("clip_l", "clip_g") if isinstance(obj.get(k), torch.Tensor)
        )
        raise EmbeddingError(
            f"{p}: this is an SDXL embedding ({shapes}); this model needs {width}-wide vectors (Stable Diffusion v1)"
        )

    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise EmbeddingError(f"{p}: holds no tensor; not an embedding")
    if len(tensors) > 1:
        keys = ", ".join(str(k) for k in list(tensors)[:3]) + (", ..." if len(tensors) > 3 else "")
        raise EmbeddingError(
            f"{p}: holds {len(tensors)} tensors ({keys}); an embedding file has one (is it a LoRA or a model?)"
        )
    key, tensor = next(iter(tensors.items()))
    return tensor, "emb_params" if key == "emb_params" else "diffusers"


def _check_vectors(tensor: torch.Tensor, p: Path, width: int) -> torch.Tensor:
    if not tensor.is_floating_point():
        raise EmbeddingError(f"{p}: holds {str(tensor.dtype).replace('torch.', '')} values, not floating-point vectors")
    if tensor.dim() == 1:  # diffusers: one vector
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise EmbeddingError(f"{p}: its tensor is {list(tensor.shape)}; an embedding is (vectors, {width})")
    n, w = tensor.shape
    if w != width:
        known = {1024: " (a Stable Diffusion 2.x embedding)", 1280: " (an SDXL clip_g embedding)",
                 2048: " (an SDXL embedding)", 768: " (a Stable Diffusion v1 embedding)"}
        raise EmbeddingError(f"{p}: its vectors are {w} wide{known.get(w, '')}; this model needs {width}")
    if n == 0:
        raise EmbeddingError(f"{p}: holds no vectors")
    if n > MAX_VECTORS:
        raise EmbeddingError(f"{p}: holds {n} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    vectors = tensor.detach().to("cpu", torch.float32).clone().contiguous()
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{p}: its vectors hold NaN or infinite values")
    return vectors
