"""``/verify [IMAGE.png]`` in the app (a mixin of :class:`~sdterm.ui.app.SdtermApp`): the image
last shown (or IMAGE.png) rendered again on the app's engine, in a worker like any render (the
screen stays live, Escape cancels, renders asked for meanwhile queue behind it), and the verdict on
the notice line: identical / within N levels / different, and the stamp fields that differ from
this machine. The procedure is ``sdterm/verify.py``; nothing is written, nothing of the session
changes."""

from __future__ import annotations

import threading
from pathlib import Path

from textual import work

from ..errors import UserError
from .messages import EngineEvent, RenderFailed
from .widgets.stage_panel import StagePanel

MODEL_FIELDS = ("model sha256", "model hash")


class Verifying:
    """Mixin: ``/verify``."""

    def verify_command(self, outcome) -> None:
        """``/verify`` (``outcome.message``: a path, or "" for the image last shown)."""
        from ..verify import read_image

        path = outcome.message or self.session.last_path
        if not path:
            self.notice("/verify: no image yet: render one, or /verify IMAGE.png", "warning")
            return
        if self.engine is None:
            self.notice("/verify: no model loaded yet: try again when it is ready", "warning")
            return
        if self.busy:
            self.notice("/verify: a render is running: try again when it ends", "warning")
            return
        try:
            request = read_image(path)
        except UserError as exc:
            self.notice(f"/verify: {exc}", "error")
            return
        render_id = next(self._ids)  # the render slot: renders asked for meanwhile queue behind it
        self._current, self._cancel = render_id, threading.Event()
        self.query_one(StagePanel).start(request.params.steps, hires=request.params.hires)
        self.notice(f"verifying {Path(path).name}: rendering it again…")
        self._verify_worker(request, render_id, self._cancel)

    @work(thread=True, group="render")
    def _verify_worker(self, request, render_id: int, cancel: threading.Event) -> None:
        from ..verify import verify

        def emit(event) -> None:
            self.post_message(EngineEvent(event, render_id))

        try:
            verdict = verify(request, self.service, emit=emit, cancelled=cancel.is_set)
        except Exception as exc:  # one line on the notice line, as a failed render's
            self.post_message(RenderFailed.from_exception(exc, render_id, self.print_tracebacks))
            return
        self.call_from_thread(self._verify_done, render_id, verdict)

    def _verify_done(self, render_id: int, verdict) -> None:
        if render_id != self._current:
            return
        self.notice(verify_line(verdict, self.engine), "info" if verdict.ok else "error")
        self._finished()


def verify_line(verdict, engine=None) -> str:
    """The verdict in one line: the file, identical / within / different, then what differs."""
    line = f"verify {verdict.path.name}: {verdict.line()}"
    if not verdict.stamped:
        line += " · no stamp in the image (rendered from its parameters)"
    elif verdict.causes:
        line += " · differs here: " + ", ".join(name for name, _, _ in verdict.causes)
    if any(name in MODEL_FIELDS for name, _, _ in verdict.causes) and engine is not None:
        line += f" (the app renders with {engine.source.name}: /model NAME switches)"
    return line
