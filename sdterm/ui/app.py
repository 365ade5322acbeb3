"""The sdterm app: prompt, live stage panel, image, history recall and seed tweaking.

Renders go through the render service (``sdterm/service.py``: render, save, record) in a thread
worker; the engine reports through its events, posted here as messages, so the screen never waits
on it. All session state is touched on the UI thread only.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import CommandPalette
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input, Static

from ..commands import CommandError, Outcome, parse_command
from ..errors import ConfigError, debug_enabled
from ..history import Recall
from ..params import Params
from ..service import RenderService, SaveError
from ..session import VARIATION_STEP, Session
from ..units import format_bytes
from .messages import EngineEvent, RenderDone, RenderFailed
from .screens import HelpScreen, HistoryProvider, summary
from .text import plain
from .widgets.image_view import ImageView
from .widgets.prompt import PromptInput
from .widgets.stage_panel import StagePanel


class SdtermApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "sdterm"
    COMMANDS = {HistoryProvider}
    BINDINGS = [
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("escape", "cancel", "cancel"),
        Binding("ctrl+r", "search_history", "history"),
        Binding("question_mark", "help", "help"),
        Binding("tab", "focus_cycle(1)", "focus", show=False, priority=True),
        Binding("shift+tab", "focus_cycle(-1)", "focus", show=False, priority=True),
    ]

    def __init__(self, service: RenderService, session: Session, *, image_protocol: str = "auto",
                 debug: bool = False) -> None:
        super().__init__()
        self.service = service
        self.engine = service.engine
        self.session = session
        self.image_protocol = image_protocol
        self.recall = Recall(session.history)
        self._ids = itertools.count(1)
        self._current: int | None = None
        self._cancel: threading.Event | None = None
        self._pending: Params | None = None
        self._pending_budget: tuple[bool, int | None] = (False, None)
        self.last_result = None
        self._recalled: Params | None = None
        self.print_tracebacks = debug_enabled(debug)
        """--debug / SDTERM_DEBUG=1: the caller prints ``internal_errors`` after the app exits."""
        self.internal_errors: list[str] = []
        """The traceback of each internal error (bug) caught in a render, oldest first."""
        self.error_log: Path | None = None
        """The file those tracebacks were also appended to (None until one was written)."""

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        demo = self.engine.source.demo
        banner = "demo model: random weights, images are noise" if demo else ""
        with Vertical(id="top"):
            yield PromptInput(placeholder="prompt — Enter renders · /help for commands", id="prompt",
                              recall=self.recall_step)
            yield Input(placeholder="negative prompt", id="negative")
            yield Static(id="params")
        with Horizontal(id="main"):
            yield ImageView(self.image_protocol, banner, id="view")
            yield StagePanel(cuda=self.engine.device.type == "cuda", id="panel")
        yield Static(id="notice")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(StagePanel).border_title = plain(f"model {self.engine.source.name}")
        self.query_one(ImageView).border_title = plain("image")
        self.query_one("#negative", Input).value = self.session.params.negative
        self.refresh_params()
        self.query_one("#prompt").focus()
        skipped = self.session.history.skipped
        if skipped:
            self.notice(f"history: skipped {skipped} unreadable line(s)", "warning")

    # ---- helpers -----------------------------------------------------------------------------

    def notice(self, message: str | Text, level: str = "info") -> None:
        """One line at the bottom; a str is shown exactly as written (never parsed as markup)."""
        style = {"info": "", "warning": "yellow", "error": "bold red"}[level]
        self.query_one("#notice", Static).update(message if isinstance(message, Text) else plain(message, style))

    def refresh_params(self) -> None:
        line = self.session.describe()
        if self.session.budget is None and not self.busy:
            effective = self.engine.effective_budget()
            if effective is not None:
                line += f" ({format_bytes(effective, 'short')})"
        self.query_one("#params", Static).update(plain(f"{line} · model {self.engine.source.name}"))

    @property
    def busy(self) -> bool:
        return self._current is not None

    # ---- rendering ---------------------------------------------------------------------------

    def render_request(self, req: Params | None) -> None:
        """Start ``req`` now, or make it the one pending render (the latest wins)."""
        if req is None:
            self.notice("nothing rendered yet: type a prompt first", "warning")
            return
        if self.busy:
            replaced = self._pending is not None
            self._pending = req
            self.notice(f"queued seed {req.seed}" + (" (replaces the earlier queued render)" if replaced else ""))
            return
        self._start(req)

    def _start(self, req: Params) -> None:
        render_id = next(self._ids)
        self._current = render_id
        self._cancel = threading.Event()
        self.query_one(StagePanel).start(req.steps)
        self.refresh_params()
        self.notice(f"rendering seed {req.seed}…")
        self._render(req, render_id, self._cancel)

    @work(thread=True, group="render")
    def _render(self, req: Params, render_id: int, cancel: threading.Event) -> None:
        def emit(event) -> None:
            self.post_message(EngineEvent(event, render_id))

        try:
            result = self.service.render(req, emit=emit, cancelled=cancel.is_set)
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
        if self._pending is not None:
            req, self._pending = self._pending, None
            self._start(req)

    @on(EngineEvent)
    def _engine_event(self, message: EngineEvent) -> None:
        if message.render_id != self._current:
            return
        from ..engine.events import Notice

        if isinstance(message.event, Notice):
            self.notice(message.event.message, message.event.level)
        else:
            self.query_one(StagePanel).handle(message.event)

    @on(RenderDone)
    def _render_done(self, message: RenderDone) -> None:
        result = message.result
        self.last_result = result
        req = result.request
        demo = " · demo model: the image is noise" if result.demo else ""
        caption = f"seed {req.seed} · {req.width}×{req.height} · {result.seconds:.1f}s · {result.plan}{demo}"
        self.query_one(ImageView).show(result.image, caption)
        if message.path is not None:
            self.session.last_path = message.path
        try:
            self.service.record(req, message.path, result.model_hash)
            history_error = None
        except OSError as exc:
            history_error = f"history not written ({exc.strerror or exc}): {self.service.history.path}"
        if message.error:
            self.notice(message.error, "error")
        elif history_error:
            self.notice(f"saved {message.path}, but {history_error}", "warning")
        else:
            path = Path(message.path).resolve()
            text = Text("saved ")
            text.append(str(message.path), style=f"link {path.as_uri()}")
            cache = result.stages[0].cache
            if cache:
                text.append(f" · text encoder cache {cache}")
            self.notice(text)
        self.recall.reset()
        self._finished()

    @on(RenderFailed)
    def _render_failed(self, message: RenderFailed) -> None:
        if message.traceback is not None:
            self.internal_errors.append(message.traceback)
            self.error_log = message.log or self.error_log
        if message.cancelled:
            self.query_one(StagePanel).cancelled()
            self.notice(message.message, "warning")
        else:
            self.notice(message.message, "error")
        self._finished()

    # ---- input -------------------------------------------------------------------------------

    @on(Input.Submitted, "#prompt")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value
        try:
            command = parse_command(text)
        except CommandError as exc:
            self.notice(str(exc), "error")
            return
        if command is not None:  # PromptInput cleared the box at the Enter, in key order
            self.run_command(command)
            return
        self.session.set_negative(self.query_one("#negative", Input).value)
        recalled, self._recalled = self._recalled, None
        try:
            if recalled is not None and recalled.prompt == text:
                # A recalled render runs again as it was, seed included (even when unlocked).
                req = self.session.rerun(text)
            else:
                req = self.session.new_prompt(text)
        except ConfigError as exc:
            self.notice(str(exc), "error")
            return
        self.recall.reset()
        self.render_request(req)

    @on(Input.Changed, "#negative")
    def _negative_changed(self, event: Input.Changed) -> None:
        self.session.set_negative(event.value)

    @on(Input.Submitted, "#negative")
    def _negative_submitted(self, event: Input.Submitted) -> None:
        prompt = self.query_one("#prompt", Input).value
        if prompt and not prompt.startswith("/"):
            self.query_one("#prompt", Input).action_submit()

    def recall_step(self, direction: int) -> None:
        """Up (-1) / Down (+1) in the prompt box; PromptInput calls it at the key, in key order."""
        box = self.query_one("#prompt", Input)
        if direction < 0:
            entry = self.recall.older(box.value)
        else:
            entry = self.recall.newer()
        if entry is None:
            return
        if isinstance(entry, str):  # back to the draft being typed
            box.value = entry
        else:
            self.restore_params(entry.params, focus=False)
        box.cursor_position = len(box.value)

    def restore_params(self, params: Params, focus: bool = True) -> None:
        """Put an earlier render's prompt and settings back (history recall and search, /load);
        the seed keys then tweak it. ConfigError, with nothing changed, when it can't be rendered."""
        self.session.restore(params)
        self._recalled = params
        box = self.query_one("#prompt", Input)
        box.value = params.prompt
        box.cursor_position = len(params.prompt)
        self.query_one("#negative", Input).value = params.negative
        self.refresh_params()
        self.notice(f"recalled: {summary(params)}")
        if focus:
            box.focus()

    def run_command(self, command) -> None:
        """A slash command: its registry entry's handler (in the session), then what it asks of the app."""
        try:
            outcome = self.session.apply(command)
        except CommandError as exc:
            self.notice(str(exc), "error")
            return
        effects = {
            "quit": lambda o: self.action_quit(),
            "help": lambda o: self.action_help(),
            "open": lambda o: self.show_last_path(o.message),
            "cache": lambda o: self.notice(cache_stats_line(self.engine)),
            "load": lambda o: self.load_image_parameters(o.message),
            "budget": self._budget_changed,
        }
        effect = effects.get(outcome.action)
        if effect is not None:
            effect(outcome)
        elif outcome.message:
            self.notice(outcome.message)
        self.query_one("#negative", Input).value = self.session.params.negative
        self.refresh_params()

    def _budget_changed(self, outcome: Outcome) -> None:
        message = outcome.message
        if self.engine.device.type != "cuda":  # kept for the record, but nothing is placed on a CPU
            message += ": no effect here, rendering on the CPU"
        if self.busy:
            self._pending_budget = (True, self.session.budget)
            self.notice(message + " (after this render)")
        else:
            self.engine.set_budget(self.session.budget)
            self.notice(message)

    def load_image_parameters(self, path: str) -> None:
        """/load: the prompt and settings stored in a PNG (sdterm's or AUTOMATIC1111's)."""
        from ..pngmeta import MetadataError, read_png_parameters

        try:
            found = read_png_parameters(Path(path).expanduser())
        except MetadataError as exc:
            self.notice(str(exc), "error")
            return
        try:
            self.restore_params(found.params)
        except ConfigError as exc:
            self.notice(f"{path}: {exc}", "error")
            return
        self.notice(f"loaded from {path}: {summary(found.params)} — Enter renders it")

    def show_last_path(self, fallback: str) -> None:
        path = self.session.last_path
        if not path:
            self.notice(fallback or "nothing rendered yet", "warning")
            return
        text = Text("last image: ")
        text.append(path, style=f"link {Path(path).resolve().as_uri()}")
        self.notice(text)

    # ---- actions -----------------------------------------------------------------------------

    def action_focus_cycle(self, direction: int) -> None:
        order = [self.query_one("#prompt"), self.query_one(ImageView), self.query_one("#negative")]
        focused = self.focused
        index = order.index(focused) if focused in order else -1
        # Screen.set_focus at once, not Widget.focus() (which defers it with call_later): a key
        # typed right after Tab must go to the newly focused widget (`Tab ]` in one burst).
        self.screen.set_focus(order[(index + direction) % len(order)])

    def action_cancel(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self._pending = None
        if self._cancel is not None:
            self._cancel.set()
            self.notice("cancelling at the next step…", "warning")

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_search_history(self) -> None:
        self.push_screen(CommandPalette(providers=[HistoryProvider], placeholder="search earlier prompts…"))

    def action_command_palette(self) -> None:
        """Ctrl+P (Textual's palette key) opens the same history search: the palette lists only
        earlier prompts, so it must not promise "commands"."""
        if not isinstance(self.screen, CommandPalette):
            self.action_search_history()

    def action_quit(self) -> None:
        self._pending = None
        if self._cancel is not None:
            self._cancel.set()
        self.exit()

    def action_nudge(self, delta: int) -> None:
        self.render_request(self.session.nudge_seed(delta))
        self.refresh_params()

    def action_reroll(self) -> None:
        self.render_request(self.session.reroll())
        self.refresh_params()

    def action_lock(self) -> None:
        locked = self.session.toggle_lock()
        self.notice("seed locked: new prompts keep it" if locked else "seed unlocked: each new prompt gets a new seed")
        self.refresh_params()

    def action_variation(self, direction: int) -> None:
        if self.session.last_prompt is None:
            self.render_request(None)
            return
        req = self.session.change_variation(VARIATION_STEP * direction)
        if req is None:
            self.notice(f"variation strength is already {self.session.params.subseed_strength:g}", "warning")
            return
        self.render_request(req)
        self.refresh_params()


def cache_stats_line(engine) -> str:
    cache = engine.cache
    if cache is None:
        return "embedding cache: off"
    st = cache.stats()
    # The same figures, in the same units, as `sdterm doctor` and `sdterm cache stats`.
    return f"embedding cache {cache.folder}: {st.entries} entries, {format_bytes(st.bytes)} of {format_bytes(cache.max_bytes)}"
