"""``sdterm generate``'s ways of reporting a render as it goes: ``--progress json`` (one JSON
object a line on stdout, for other front ends) and ``--preview FILE.png`` (the latest live preview
written over FILE, atomically, for scripts)."""

from __future__ import annotations

import io
import json
import sys
import threading
from pathlib import Path

PREVIEW_INTERVAL = 0.5
"""Seconds between preview frames written to ``--preview FILE`` (a PNG a frame)."""


class JsonProgress:
    """Engine events as JSON lines on stdout: ``{"event": "step" | "stage" | "notice" | "preview", ...}``;
    the result line follows with ``"event": "result"``. Thread-safe (previews arrive from the
    engine's preview thread)."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def line(self, obj: dict) -> None:
        with self._lock:
            self.out.write(json.dumps(obj) + "\n")
            self.out.flush()

    def __call__(self, event) -> None:
        from ..engine.events import Notice, Preview, StageFinished, StepDone

        if isinstance(event, StepDone):
            self.line({"event": "step", "step": event.step, "total": event.total,
                       "elapsed": round(event.elapsed, 4), "t": round(float(event.timestep), 6)})
        elif isinstance(event, StageFinished):
            self.line({"event": "stage", **event.stats.to_dict()})
        elif isinstance(event, Notice):
            self.line({"event": "notice", "message": event.message, "level": event.level})
        elif isinstance(event, Preview):
            self.line({"event": "preview", "stage": event.stage, "step": event.step, "total": event.total})


class PreviewFile:
    """Writes each :class:`~sdterm.engine.events.Preview` frame over ``path`` (a temporary file
    renamed into place: a reader never sees half a PNG), at the image's size (the linear map's
    latent-sized frames scaled up with nearest-neighbour)."""

    def __init__(self, path: Path):
        self.path = path
        self.written = 0
        self.error: OSError | None = None
        """The first write that failed (the render goes on; the caller reports it once)."""

    @classmethod
    def checked(cls, path: Path) -> "PreviewFile":
        """A writer for ``path``, or UserError (one line) when its folder can't take it."""
        import os

        from ..errors import UserError

        folder = path.parent
        if path.is_dir():
            raise UserError(f"--preview {path}: is a folder; give a file name such as {path / 'preview.png'}")
        if not folder.is_dir():
            raise UserError(f"--preview {path}: the folder {folder} doesn't exist; create it or give another path")
        if not os.access(folder, os.W_OK):
            raise UserError(f"--preview {path}: the folder {folder} isn't writable; give another path")
        return cls(path)

    def __call__(self, event) -> None:
        from PIL import Image

        from ..engine.events import Preview
        from ..fsutil import atomic_write_bytes

        if not isinstance(event, Preview) or self.error is not None:
            return
        image = event.image
        if event.scale != 1:  # the linear map's latent-sized frame (a TAESD frame is image-sized already)
            image = image.resize((image.width * event.scale, image.height * event.scale), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        try:
            atomic_write_bytes(self.path, buf.getvalue())
        except OSError as exc:  # a full disk, a folder gone: the render itself goes on
            self.error = exc
            return
        self.written += 1


def fan_out(*sinks):
    """One ``emit`` calling each sink that is not None."""
    live = [s for s in sinks if s is not None]

    def emit(event) -> None:
        for sink in live:
            sink(event)

    return emit
