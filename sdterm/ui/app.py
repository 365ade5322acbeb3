"""The sdterm app: prompt, live stage panel, image, history recall and seed tweaking.

The model loads in a thread worker while the screen is already up (typing works at once; a render
asked for meanwhile starts when the model is ready), and ``/model`` loads another the same way.
Renders go through the render service (``sdterm/service.py``: render, save, record) in a thread
worker; the engine reports through its events, posted here as messages, so the screen never waits
on it. All session state is touched on the UI thread only.

What the prompt box and the slash commands do is :class:`~sdterm.ui.prompting.PromptFlow`; the keys
on the image (seed, variation, re-render, zoom) are :class:`~sdterm.ui.keys.Keys`.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Callable

from PIL import Image
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input, Static

from ..errors import debug_enabled
from ..params import Params, batch
from ..service import RenderService, SaveError
from ..session import Session
from ..units import format_bytes
from .addons import Addons, lora_values, vae_values
from .forking import Forking
from .loading import ModelLoading, job_text
from .keys import Keys
from .messages import EngineEvent, RenderDone, RenderFailed
from .prompting import PromptFlow
from .screens import HistoryProvider
from .verifying import Verifying
from .text import plain
from .widgets.image_view import ImageView
from .widgets.prompt import PromptInput
from .widgets.stage_panel import StagePanel
from .widgets.token_line import TokenLine

Loader = Callable[[str | None, Callable[[str], None]], RenderService]
"""``load(name, progress)``: the render service for model ``name`` (None: the configured one);
``progress(text)`` says what it is doing. Runs on a worker thread; raises what the command line would."""


PREVIEW_INTERVAL = 1 / 8
"""Seconds between live preview frames asked of the engine (the image view may draw fewer)."""


class SdtermApp(PromptFlow, Keys, Addons, Verifying, Forking, ModelLoading, App):
    CSS_PATH = "app.tcss"
    TITLE = "sdterm"
    COMMANDS = {HistoryProvider}
    BINDINGS = [
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("f1", "help", "help", priority=True),
        Binding("escape", "cancel", "cancel"),
        Binding("ctrl+r", "search_history", "history"),
        Binding("f2", "draft", "draft", show=False, priority=True),
        Binding("f3", "full_quality", "full quality", show=False, priority=True),
        Binding("question_mark", "help", "help", show=False),
        Binding("z", "zoom", "zoom", show=False),
        Binding("tab", "focus_cycle(1)", "focus", show=False, priority=True),
        Binding("shift+tab", "focus_cycle(-1)", "focus", show=False, priority=True),
    ]

    def __init__(self, service: RenderService | None, session: Session, *, load: Loader | None = None,
                 model_names: Callable[[], list[str]] | None = None, image_protocol: str = "auto",
                 debug: bool = False) -> None:
        """``service``: a ready model; or None, and ``load`` loads one once the screen is up."""
        super().__init__()
        if service is None and load is None:
            raise TypeError("SdtermApp needs a render service or a loader")
        self.service = service
        self.session = session
        self.load_model = load
        self.model_names = model_names or (lambda: [])
        self.image_protocol = image_protocol
        self._ids = itertools.count(1)
        self._current: int | None = None
        self._cancel: threading.Event | None = None
        self._job: list[Params] = []
        """The renders of the running batch still to start."""
        self._pending: list[Params] = []
        """The next batch (or single render), queued while a render runs or the model loads."""
        self._pending_budget: tuple[bool, int | None] = (False, None)
        self._pending_model: str | None = None
        self._sheet: list[tuple[Params, Image.Image, str | None]] | None = None
        """The running batch's finished renders (the contact sheet); None for a single render."""
        self._rendered: dict[Params, str] = {}
        """Finished renders of this model: request -> image file (what the seed keys may show again)."""
        self._loading: tuple[str, float] | None = None
        self._load_timer = None
        self.last_result = None
        self._fork_next = None
        """``/fork K``: (the fork, its history record) for the next render to start."""
        self._fork_record: dict | None = None
        """The render in progress's fork (parent image, step) for the history; None when not a fork."""
        self.print_tracebacks = debug_enabled(debug)
        """--debug / SDTERM_DEBUG=1: the caller prints ``internal_errors`` after the app exits."""
        self.internal_errors: list[str] = []
        """The traceback of each internal error (bug) caught, oldest first."""
        self.error_log: Path | None = None
        """The file those tracebacks were also appended to (None until one was written)."""
        self.init_prompt_flow(session)

    @property
    def engine(self):
        """The loaded model's engine; None while a model loads (or none could be loaded)."""
        return self.service.engine if self.service is not None else None

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            yield PromptInput(placeholder="prompt — Enter renders · /help for commands · F1 keys", id="prompt",
                              recall=self.recall_step, paste=self.paste_block, help=self.action_help,
                              values={"model": lambda typed: self.model_names(), "vae": vae_values,
                                      "lora": lora_values})
            yield TokenLine(id="tokens")
            yield Input(placeholder="negative prompt", id="negative", select_on_focus=False)
            yield Static(id="params")
        with Horizontal(id="main"):
            yield ImageView(self.image_protocol, "", id="view")
            yield StagePanel(cuda=False, id="panel")
        yield Static(id="notice")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ImageView).border_title = plain("image")
        self.query_one("#negative", Input).value = self.session.params.negative
        self.query_one("#prompt").focus()
        history = self.session.history
        if getattr(history, "repaired", 0):
            self.notice(f"history: moved {history.repaired} unreadable line(s) to {history.quarantine}", "warning")
        elif history.skipped:
            self.notice(f"history: skipped {history.skipped} unreadable line(s)", "warning")
        if self.service is not None:
            self._model_ready(self.service)
        else:
            self.begin_load(None)

    # ---- helpers -----------------------------------------------------------------------------

    def notice(self, message: str | Text, level: str = "info") -> None:
        """One line at the bottom; a str is shown exactly as written (never parsed as markup)."""
        style = {"info": "", "warning": "yellow", "error": "bold red"}[level]
        self.query_one("#notice", Static).update(message if isinstance(message, Text) else plain(message, style))

    def refresh_params(self) -> None:
        line = self.session.describe()
        engine = self.engine
        if engine is not None and self.session.budget is None and not self.busy:
            effective = engine.effective_budget()
            if effective is not None:
                line += f" ({format_bytes(effective, 'short')})"
        if engine is not None:
            line += f" · model {engine.source.name}"
        elif self._loading is not None:
            line += f" · loading {self._loading[0]}…"
        else:
            line += " · no model: /model NAME loads one"
        self._params_line = line
        self.show_params()
        self.refresh_tokens()  # the steps, the sampler or the model may have changed

    def show_params(self) -> None:
        """The parameter line as last described, with the prompt box's LoRAs as they are now. On
        the main screen whatever screen is on top (a change can arrive while a popup is up or the
        app is closing: then there may be no line to update)."""
        if self.screen_stack:
            for line in self.screen_stack[0].query("#params").results(Static):
                line.update(self.params_text(getattr(self, "_params_line", "")))

    @property
    def busy(self) -> bool:
        return self._current is not None or self._vae_switch

    def switch_model(self, name: str) -> None:
        """``/model NAME``: after the render in flight (if any), unload this model and load ``name``."""
        if self.load_model is None:
            self.notice("this session cannot switch models (started on a fixed model)", "warning")
        elif self.busy:
            self._pending_model = name
            self.notice(f"loading {name} after this render")
        elif self._loading is not None:
            self.notice(f"still loading {self._loading[0]}: try again when it is ready", "warning")
        else:
            self.begin_load(name)

    # ---- rendering ---------------------------------------------------------------------------

    def render_request(self, req: Params | None, *, reuse: bool = False, single: bool = False) -> None:
        """Start ``req`` (as many renders as the batch count; ``single``: one) now, or make it the
        pending job (the latest wins). ``reuse``: a render this model already made is shown again."""
        if req is None:
            self.notice("nothing rendered yet: type a prompt first", "warning")
            return
        job = [req] if single else batch(req, self.session.batch_count)
        if reuse and len(job) == 1 and self.show_existing(req):
            return
        if self.busy or self.service is None:
            replaced = bool(self._pending)
            self._pending = job
            why = "the model loads" if self.service is None and self._loading else "this render"
            self.notice(f"queued {job_text(job)} after {why}"
                        + (" (replaces the earlier queued render)" if replaced else ""))
            if self.service is None and self._loading is None:
                self._pending = []
                self.notice("no model loaded: /model NAME loads one", "error")
            return
        self._start_job(job)

    def _take_pending(self) -> list[Params]:
        job, self._pending = self._pending, []
        return job

    def _start_job(self, job: list[Params]) -> None:
        self._sheet = [] if len(job) > 1 else None
        self._job = list(job)
        self._start_next()

    def _start_next(self) -> None:
        req = self._job.pop(0)
        render_id = next(self._ids)
        self._current = render_id
        self._cancel = threading.Event()
        self.query_one(StagePanel).start(req.steps, hires=req.hires)
        self.refresh_params()
        part = f" ({len(self._sheet) + 1} of {len(self._sheet) + 1 + len(self._job)})" if self._sheet is not None else ""
        fork, self._fork_record = self.take_fork()
        self.notice(f"rendering seed {req.seed}{part}" + (f" from step {self._fork_record['step']}" if fork else "")
                    + "…")
        self._render(req, render_id, self._cancel, fork)

    @work(thread=True, group="render")
    def _render(self, req: Params, render_id: int, cancel: threading.Event, fork=None) -> None:
        def emit(event) -> None:
            self.post_message(EngineEvent(event, render_id))

        try:
            # A single image shows its preview as it forms and keeps its steps for /fork.
            single = self._sheet is None
            result = self.service.render(req, emit=emit, cancelled=cancel.is_set, fork=fork, trail=single,
                                         preview=PREVIEW_INTERVAL if single else None)
            if cancel.is_set():
                self.post_message(RenderFailed(render_id, "cancelled: nothing was written", cancelled=True))
                return
            path, error = None, None
            try:
                path = str(self.service.save(req, result))
            except OSError as exc:
                kept = f" and in {exc.kept}" if isinstance(exc, SaveError) and exc.kept else ""
                error = (f"cannot write to {self.service.outdir} ({exc.strerror or exc}); the image is kept on "
                         f"screen{kept} — free space or restart with --outdir DIR")
            self.post_message(RenderDone(render_id, result, path, error))
        except Exception as exc:  # one line on the notice line, never a traceback on screen
            self.post_message(RenderFailed.from_exception(exc, render_id, self.print_tracebacks))

    def _finished(self) -> None:
        self._current = None
        self._cancel = None
        apply, budget = self._pending_budget
        if apply:
            self.engine.set_budget(budget)
            self._pending_budget = (False, None)
            self.refresh_params()
        if self.take_pending_vae():
            return
        if self._pending_model is not None:
            name, self._pending_model = self._pending_model, None
            self._job = []
            self.begin_load(name)
        elif self._pending:
            self._start_job(self._take_pending())
        elif self._job:
            self._start_next()

    @on(EngineEvent)
    def _engine_event(self, message: EngineEvent) -> None:
        if message.render_id != self._current:
            return
        from ..engine.events import Notice, Preview

        event = message.event
        if isinstance(event, Notice):
            self.notice(event.message, event.level)
            return
        if not self.screen_stack:  # the app is closing: nothing to draw on
            return
        main = self.screen_stack[0]  # the panels live there, whatever popup is on top
        if isinstance(event, Preview):
            if self._sheet is None:  # a single render: the picture forming (a batch shows its sheet)
                what = "hires pass " if event.stage == "hires" else ""
                size = (event.image.width * event.scale, event.image.height * event.scale)
                main.query_one(ImageView).show_preview(event.image, f"preview · {what}step {event.step}/{event.total}",
                                                       size)
        else:
            main.query_one(StagePanel).handle(event)

    @on(RenderDone)
    def _render_done(self, message: RenderDone) -> None:
        result = message.result
        self.last_result = result
        req = result.request
        demo = " · demo model: the image is noise" if result.demo else ""
        caption = f"seed {req.seed} · {req.width}×{req.height} · {result.seconds:.1f}s · {result.plan}{demo}"
        view = self.query_one(ImageView)
        if self._sheet is None:
            view.show(result.image, caption)
        else:
            self._sheet.append((req, result.image, message.path))
            if len(self._sheet) == 1:
                view.show_sheet([result.image], [caption])
            else:
                view.add_to_sheet(result.image, caption)
        if message.path is not None:
            self.session.last_path = message.path
            self._remember(req, message.path)
        try:
            self.service.record(req, message.path, result.model_hash, self._fork_record)
            history_error = None
        except OSError as exc:
            history_error = f"history not written ({exc.strerror or exc}): {self.service.history.path}"
        if message.error:
            self.notice(message.error, "error")
        elif history_error:
            self.notice(f"saved {message.path}, but {history_error}", "warning")
        else:
            text = Text("saved ")
            text.append(str(message.path), style=f"link {Path(message.path).resolve().as_uri()}")
            cache = result.stages[0].cache
            if cache:
                text.append(f" · text encoder cache {cache}")
            if self._sheet is not None and not self._job:
                text.append(" · ← → pick an image, Enter works on it")
            self.notice(text)
        self.recall.reset()
        self._finished()

    @on(RenderFailed)
    def _render_failed(self, message: RenderFailed) -> None:
        if message.traceback is not None:
            self.internal_errors.append(message.traceback)
            self.error_log = message.log or self.error_log
        self._job = []  # the rest of a batch after a failure: not started
        if message.cancelled:
            self.query_one(StagePanel).cancelled()
            self.query_one(ImageView).preview_cancelled()  # the last preview stays, marked cancelled
            self.notice(message.message, "warning")
        else:
            self.notice(message.message, "error")
        self._finished()
