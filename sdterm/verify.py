"""Verifying an image: render its recorded request again and compare pixels and stamps.

The one procedure behind ``sdterm verify IMAGE`` (``sdterm/cli/verify.py``) and the app's
``/verify`` (``sdterm/ui/verifying.py``):

1. :func:`read_image`: the image's request (sdterm's chunk, else A1111's text: what can be
   rendered of it; what sdterm can't reproduce is noted as ``sdterm show`` notes it) and its stamp
   (``sdterm/stamp.py``; None for A1111's and older images). Bad input is one line (UserError).
2. :func:`find_model`: the model file whose sha256 is the stamp's (else whose first 10 hex digits
   are A1111's ``Model hash``), among the models folder's, the configured default and, for a demo
   image, ``sdterm --demo``'s demo model; hashes through the same memo as the engine's (free once computed).
3. :func:`verify`: render the request through the render service (the path ``generate`` and the
   app use), in memory: nothing is written, the image is only read. Compare pixels (max and mean
   absolute difference over all pixels and channels, 0..255) and this render's stamp with the
   image's: the fields that differ are the likely causes of a pixel difference.

The verdict (:class:`Verdict`): identical, within the tolerance (default :data:`DEFAULT_TOLERANCE`
levels on a GPU, :data:`CPU_TOLERANCE` on the CPU), or different. No UI imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError, UserError
from .imagetext import MetadataError, one_line
from .params import Params
from .stamp import differences, read_stamp, value_text

DEFAULT_TOLERANCE = 2
"""Levels (of 255) a render may differ by and still pass. Measured on an H200 (torch 2.11, CUDA
13.0, fp16; full-size SD v1 random weights, 512x512, 8 steps, CFG 7): the same plan twice, and a
resident, staged or streamed U-Net, give identical pixels; the CFG split (one U-Net pass per
guidance half, low budgets) moves them by at most 1 level (mean 0.10); a tiled VAE decode (256px
tiles) by up to 16 (mean 1.4): that one fails, and the stamp's ``plan`` names the cause. The
CPU (fp32) reproduces itself exactly. A different GPU, torch or dtype moves pixels further (the
tiny demo model: 2 levels, fp16 on the GPU vs fp32 on the CPU; a real model much more)."""

CPU_TOLERANCE = 0
"""The default tolerance of a render on the CPU: fp32 on the CPU reproduces itself exactly."""


def default_tolerance(device) -> int:
    """:data:`CPU_TOLERANCE` for a render on the CPU, else :data:`DEFAULT_TOLERANCE`."""
    return CPU_TOLERANCE if getattr(device, "type", "cpu") == "cpu" else DEFAULT_TOLERANCE


@dataclass
class Request:
    """What an image says to render again."""

    path: Path
    found: Any
    """:class:`~sdterm.pngmeta.ImageParameters`."""
    params: Params
    """The validated request."""
    stamp: dict | None
    notes: list[str] = field(default_factory=list)
    """What sdterm can't reproduce of it (an A1111 sampler it lacks...), one line each."""


@dataclass
class Verdict:
    path: Path
    tolerance: int
    max_diff: int | None
    """None when the sizes differ."""
    mean_diff: float | None
    sizes: tuple[tuple[int, int], tuple[int, int]]
    """(the image's, the render's) width x height."""
    causes: list[tuple[str, str, str]]
    """(field, the image's value, this machine's) for each stamp field that differs."""
    stamped: bool
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.max_diff is None:
            return "different"
        return "identical" if self.max_diff == 0 else "within" if self.max_diff <= self.tolerance else "different"

    @property
    def ok(self) -> bool:
        return self.status != "different"

    def line(self) -> str:
        """The verdict in one line (its first words: identical / within N levels / different)."""
        if self.max_diff is None:
            (w, h), (rw, rh) = self.sizes
            return f"different: the render is {rw}x{rh}, the image {w}x{h}"
        figures = f"max diff {self.max_diff}, mean {self.mean_diff:.3f} levels"
        if self.status == "identical":
            return "identical: every pixel matches"
        if self.status == "within":
            return f"within {self.tolerance} levels: {figures}"
        return f"different: {figures} (tolerance {self.tolerance})"

    def cause_text(self) -> str:
        """The differing stamp fields in a few words ("" when none)."""
        return "; ".join(f"{name} {mine} (image) vs {here} (here)" for name, mine, here in self.causes)

    def lines(self) -> list[str]:
        """The report: the verdict, then the stamp's differences and the notes."""
        out = [self.line()]
        if not self.stamped:
            out.append("no stamp in the image (A1111's, or an older sdterm's): rendered from its parameters; "
                       "the machine it was made on is unknown")
        elif self.causes:
            lead = "likely causes" if self.status != "identical" else "the stamp differs from this machine"
            out += [f"{lead}:"] + [f"  {name}: {mine} (image) vs {here} (here)" for name, mine, here in self.causes]
        elif self.status == "different":
            out.append("the stamp matches this machine: the image was changed after it was saved, or this "
                       "device's kernels are not deterministic")
        return out + [f"note: {n}" for n in self.notes]


def read_image(path: str | Path) -> Request:
    """The request recorded in the image at ``path``; UserError (one line) when there is none or
    it can't be rendered."""
    from .pngmeta import read_png_parameters
    from .show import notes

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{one_line(path)}: no such image")
    try:
        found = read_png_parameters(path)
    except MetadataError as exc:
        raise UserError(f"{exc}: nothing to verify") from None
    try:
        params = found.params.validated()
    except ConfigError as exc:
        raise UserError(f"{one_line(path)}: its parameters can't be rendered ({exc})") from None
    said = notes(found)
    if found.source == "a1111" and found.get("seed") is None:
        said.append("the image records no seed: the render uses seed " + str(params.seed))
    return Request(path, found, params, read_stamp(path) if found.source == "sdterm" else None, said)


def _checkpoint_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in ("model.safetensors", "model.ckpt"):
        if (path / name).is_file():
            return path / name
    return None


def find_model(request: Request, cfg, *, progress: Callable[[str], None] = lambda text: None) -> tuple[str, str | None]:
    """(the model to render with, a note or None): the file whose sha256 the image records, in the
    models folder (the one named like the image's model first), the configured default model or,
    for a demo image, the demo model. UserError naming the hash when none has it."""
    from . import paths
    from .engine.loading.file_hash import remembered_sha256
    from .resolve import demo_model_dir, find_models, models_dir, resolve_model

    found, stamp = request.found, request.stamp or {}
    full = stamp.get("model_sha256") if isinstance(stamp.get("model_sha256"), str) else None
    short = (found.model_hash or "").strip().lower()
    if not full and not short:
        return resolve_model(None, cfg), "the image records no model hash: rendered with your default model"
    candidates = find_models()
    if cfg.defaults.model:
        candidates.append(Path(cfg.defaults.model).expanduser())
    if found.extra.get("demo") == "true" and (paths.data_dir() / "demo-model").is_dir():
        candidates.append(demo_model_dir())  # sdterm --demo's
    candidates.sort(key=lambda p: p.stem != found.model and p.name != found.model)  # the named one first
    memo = paths.hash_memo_file()
    for path in candidates:
        ckpt = _checkpoint_file(path)
        if ckpt is None:
            continue
        progress(f"hashing {path.name}")
        try:
            digest = remembered_sha256(ckpt, memo)
        except OSError:
            continue
        if digest == full or (not full and digest.startswith(short)):
            return str(path), None
    want = f"sha256 {full[:16]}…" if full else f"hash {short}"
    named = f" ({found.model})" if found.model else ""
    listed = ", ".join(p.name for p in find_models()[:5]) or "none"
    raise UserError(f"no model with the image's {want}{named} in {models_dir()} (there: {listed}): "
                    "give it with --model PATH")


def model_check(request: Request, here: dict) -> list[tuple[str, str, str]]:
    """Without a stamp: the A1111 model hash against the model used (as a stamp difference)."""
    short = (request.found.model_hash or "").strip().lower()
    sha = here.get("model_sha256") or ""
    if request.stamp is None and short and sha and not sha.startswith(short):
        return [("model hash", short, sha[: len(short)])]
    return []


def compare(path: Path, image) -> tuple[int | None, float | None, tuple]:
    """(max, mean absolute difference in levels, sizes) between the file at ``path`` and ``image``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        mine = np.asarray(im.convert("RGB"), dtype=np.int16)
    theirs = np.asarray(image.convert("RGB"), dtype=np.int16)
    sizes = ((mine.shape[1], mine.shape[0]), (theirs.shape[1], theirs.shape[0]))
    if mine.shape != theirs.shape:
        return None, None, sizes
    d = np.abs(mine - theirs)
    return int(d.max()), float(d.mean()), sizes


def verify(request: Request, service, *, tolerance: int | None = None, emit: Callable | None = None,
           cancelled: Callable[[], bool] | None = None, notes: list[str] | None = None) -> Verdict:
    """Render ``request`` again through ``service`` (:class:`~sdterm.service.RenderService`:
    render only, nothing saved) and compare; ``tolerance`` None: :func:`default_tolerance` of the
    engine's device; ``notes``: more lines for the report (the model's)."""
    from .stamp import gather

    if tolerance is None:
        tolerance = default_tolerance(getattr(service.engine, "device", None))

    result = service.render(request.params, emit=emit, cancelled=cancelled)
    here = gather(service.engine, request.params, result)
    causes = differences(request.stamp, here) if request.stamp else model_check(request, here)
    max_diff, mean_diff, sizes = compare(request.path, result.image)
    extra = [n for n in getattr(result, "notices", []) if "noise" not in n]
    return Verdict(request.path, tolerance, max_diff, mean_diff, sizes, causes, request.stamp is not None,
                   [*request.notes, *(notes or []), *extra])


__all__ = ["CPU_TOLERANCE", "DEFAULT_TOLERANCE", "default_tolerance", "Request", "Verdict", "compare", "find_model", "read_image", "value_text", "verify"]
