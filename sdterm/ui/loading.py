"""Loading a model in the app: on a worker, the screen live, progress on the notice line, and
what happens when it is ready or fails. A part of :class:`sdterm.ui.app.SdtermApp` (a mixin)."""

from __future__ import annotations

import time

from textual import work
from textual.widgets import Static

from ..service import RenderService
from .messages import LoadProgress, ModelFailed, ModelLoaded, failure_line
from .text import plain
from .widgets.image_view import ImageView
from .widgets.stage_panel import StagePanel


def job_text(job) -> str:
    """A job of renders as the notice line names it: its seed, or how many from which seed."""
    return f"{len(job)} renders from seed {job[0].seed}" if len(job) > 1 else f"seed {job[0].seed}"


class ModelLoading:
    def begin_load(self, name: str | None) -> None:
        """Load model ``name`` (None: the configured one) on a worker; the screen stays live."""
        self.service = None
        self._rendered.clear()
        self._loading = (name or "the model", time.monotonic())
        self._load_step = "starting"
        self._load_timer = self.set_interval(0.5, self._show_loading)
        self._show_loading()
        self.refresh_params()
        self._load_worker(name)

    def _show_loading(self) -> None:
        if self._loading is not None:
            name, started = self._loading
            # A render queued meanwhile stays on the line (the ticker must not wipe its notice).
            then = (f"queued {job_text(self._pending)}, it starts when the model is ready" if self._pending
                    else "type away; Enter queues the render")
            self.notice(f"loading {name}: {self._load_step}… {time.monotonic() - started:.0f}s ({then})")

    @work(thread=True, group="load", exclusive=True)
    def _load_worker(self, name: str | None) -> None:
        started = time.monotonic()
        try:
            service = self.load_model(name, lambda text: self.post_message(LoadProgress(text)))
        except Exception as exc:  # the one line on the notice line; the app stays up
            line, tb, log = failure_line(exc, self.print_tracebacks, "loading a model")
            self.post_message(ModelFailed(line, tb, log))
            return
        self.post_message(ModelLoaded(service, time.monotonic() - started))

    # Handlers by name (on_<message>): an @on decorator in a mixin is not seen by Textual, which
    # collects decorated handlers from the App class's own namespace only.
    def on_load_progress(self, message: LoadProgress) -> None:
        self._load_step = message.text
        self._show_loading()

    def _stop_loading(self) -> None:
        self._loading = None
        if self._load_timer is not None:
            self._load_timer.stop()
            self._load_timer = None

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self._stop_loading()
        self._model_ready(message.service)
        self.notice(f"model {message.service.engine.source.name} ready ({message.seconds:.1f}s)")
        if self._pending:
            self._start_job(self._take_pending())

    def on_model_failed(self, message: ModelFailed) -> None:
        self._stop_loading()
        if message.traceback is not None:
            self.internal_errors.append(message.traceback)
            self.error_log = message.log or self.error_log
        self._pending = []
        self.refresh_params()
        self.notice(f"{message.message} — /model NAME loads another, Ctrl+Q quits", "error")

    def _model_ready(self, service: RenderService) -> None:
        self.service = service
        engine = service.engine
        panel = self.query_one(StagePanel)
        panel.cuda = engine.device.type == "cuda"
        panel.border_title = plain(f"model {engine.source.name}")
        panel.refresh_table()
        banner = "demo model: random weights, images are noise" if engine.source.demo else ""
        self.query_one(ImageView).query_one("#banner", Static).update(plain(banner))
        if self.session.budget is not None or engine.budget is not None:
            engine.set_budget(self.session.budget)
        self.refresh_params()
