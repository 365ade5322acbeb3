"""The render service: what happens to every image, for ``sdterm generate`` and the app alike.

Three steps, each its own method so a front end can run them where it needs to (the app renders
and saves in its worker thread and records on its UI thread):

* :meth:`RenderService.render`: the engine renders the :class:`~sdterm.params.Params`;
* :meth:`RenderService.save`: the PNG, with its metadata (``sdterm/pngmeta.py``) and reproducibility
  stamp (``sdterm/stamp.py``), published as the next free ``OUTDIR/NNNNN-SEED.png``, never
  overwriting anything (even another sdterm's image written at the same moment); when that fails,
  a copy is kept in the temporary folder;
* :meth:`RenderService.record`: one line in the history (``sdterm/history.py``).

No UI imports (textual, rich): the service reports nothing itself; the engine's events go to the
``emit`` the front end passes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .fsutil import exclusive_publish, write_temp
from .history import History, HistoryEntry
from .params import Params
from .pngmeta import png_bytes
from .stamp import STAMP_KEY, gather

NAME_RE = re.compile(r"^(\d{5,})-")
"""An image's name in the output folder starts with its number: ``00042-1234.png``."""


class SaveError(OSError):
    """The image could not be written to the output folder (``errno``, ``strerror`` as the
    OSError that stopped it); :attr:`kept` is the copy left in the temporary folder, if any."""

    def __init__(self, exc: OSError, outdir: Path, kept: Path | None):
        super().__init__(exc.errno, exc.strerror or str(exc), exc.filename)
        self.outdir = outdir
        self.kept = kept


def next_index(outdir: Path) -> int:
    """One more than the highest image number in ``outdir`` (0 for an empty or missing folder)."""
    highest = -1
    try:
        for entry in outdir.iterdir():
            m = NAME_RE.match(entry.name)
            if m:
                highest = max(highest, int(m.group(1)))
    except FileNotFoundError:
        pass
    return highest + 1


def publish_png(data: bytes, outdir: Path, seed: int) -> Path:
    """Publish ``data`` as the next free ``NNNNN-SEED.png`` in ``outdir``; raises OSError on failure.

    The bytes go to a temporary file first, so a failure or a crash leaves no partial image under
    a real name, and an existing image is never overwritten (even by another sdterm at once).
    """
    tmp = write_temp(outdir, data, prefix=".sdterm-", suffix=".png.tmp")
    return exclusive_publish(tmp, lambda n: outdir / f"{n:05d}-{seed}.png", next_index(outdir))


def keep_copy(data: bytes, seed: int) -> Path | None:
    """Write ``data`` to ``$TMPDIR/sdterm-SEED-PID.png`` (a rescue copy); None when that fails too."""
    rescue = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdterm-{seed}-{os.getpid()}.png"
    try:
        rescue.write_bytes(data)
    except OSError:
        return None
    return rescue


class RenderService:
    """Render, save and record, for one engine, one output folder and one history."""

    def __init__(self, engine, outdir: Path, history: History | None = None, thread=None):
        self.engine = engine
        """What renders (``sdterm.engine.pipeline.Engine``, or a stand-in with ``generate``)."""
        self.outdir = Path(outdir)
        """Where images go."""
        self.history = history
        """Where renders are recorded; None records nothing."""
        self.thread = thread
        """The :class:`~sdterm.engine.render_thread.RenderThread` the engine renders on (a one-shot
        command's); None: the caller's thread."""

    def render(self, params: Params, *, emit: Callable | None = None, cancelled: Callable[[], bool] | None = None,
               **options):
        """The engine's result for ``params`` (validated by the engine); its events go to ``emit``.
        ``cancelled`` is polled at each step (the engine raises ``Cancelled``). ``options``: the
        engine's ``preview``, ``trail`` and ``fork`` (passed only when given: a stand-in engine
        without them still renders)."""
        kwargs = {k: v for k, v in options.items() if v is not None and v is not False}
        kwargs.update(emit=emit or _ignore, cancelled=cancelled or _never)
        if self.thread is not None:
            return self.thread.call(self.engine.generate, params, **kwargs)
        return self.engine.generate(params, **kwargs)

    def save(self, params: Params, result) -> Path:
        """The rendered ``result`` of ``params`` as a PNG with its metadata, in the output folder;
        its path. :class:`SaveError` when it can't be written there (a copy is kept if it can be)."""
        stamp = gather(self.engine, params, result)  # how it was made, for `sdterm verify` (stamp.py)
        data = png_bytes(result.image, params, result.model_name, result.model_hash,
                         {"demo": result.demo, STAMP_KEY: stamp},
                         getattr(result, "infotext_extra", None))  # a stand-in engine's result may lack it
        try:
            return publish_png(data, self.outdir, params.seed)
        except OSError as exc:
            raise SaveError(exc, self.outdir, keep_copy(data, params.seed)) from exc

    def record(self, params: Params, path: str | Path | None, model_hash: str,
               fork: dict | None = None) -> HistoryEntry | None:
        """Add the finished render to the history (None when there is no history); OSError when
        the history can't be written, for the caller to report. ``fork``: the parent image and
        step of a forked render."""
        if self.history is None:
            return None
        entry = HistoryEntry.now(params, path, model_hash, fork)
        self.history.append(entry)
        return entry


def _ignore(event) -> None:
    pass


def _never() -> bool:
    return False
