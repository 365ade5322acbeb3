"""Writing finished images: ``OUTDIR/NNNNN-SEED.png``, never overwriting, with the parameters
embedded as AUTOMATIC1111's ``parameters`` text chunk and the full request as JSON (``sdterm``)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict
from pathlib import Path

from PIL import Image, PngImagePlugin

from .config import RenderRequest
from .fsutil import exclusive_publish, write_temp

NAME_RE = re.compile(r"^(\d{5,})-")


def infotext(req: RenderRequest, model_name: str, model_hash: str) -> str:
    """AUTOMATIC1111's parameters text: prompt, optional negative line, then the settings line."""
    lines = [req.prompt]
    if req.negative:
        lines.append(f"Negative prompt: {req.negative}")
    settings = [
        f"Steps: {req.steps}",
        "Sampler: DDIM",
        f"CFG scale: {req.cfg:g}",
        f"Seed: {req.seed}",
        f"Size: {req.width}x{req.height}",
        f"Model hash: {model_hash}",
        f"Model: {model_name}",
    ]
    if req.subseed_strength:
        settings[4:4] = [f"Variation seed: {req.subseed}", f"Variation seed strength: {req.subseed_strength:g}"]
    if req.eta:
        settings.append(f"Eta DDIM: {req.eta:g}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def png_bytes(image: Image.Image, req: RenderRequest, model_name: str, model_hash: str, extra: dict | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(req, model_name, model_hash))
    payload = {"request": asdict(req), "model": model_name, "model_hash": model_hash, **(extra or {})}
    info.add_text("sdterm", json.dumps(payload, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def next_index(outdir: Path) -> int:
    highest = -1
    try:
        for entry in outdir.iterdir():
            m = NAME_RE.match(entry.name)
            if m:
                highest = max(highest, int(m.group(1)))
    except FileNotFoundError:
        pass
    return highest + 1


def save_png(data: bytes, outdir: Path, seed: int) -> Path:
    """Publish ``data`` as the next free ``NNNNN-SEED.png`` in ``outdir``; raises OSError on failure.

    The bytes go to a temporary file first, so a failure or a crash leaves no partial image under
    a real name, and an existing image is never overwritten (even by another sdterm at once).
    """
    tmp = write_temp(outdir, data, prefix=".sdterm-", suffix=".png.tmp")
    return exclusive_publish(tmp, lambda n: outdir / f"{n:05d}-{seed}.png", next_index(outdir))
