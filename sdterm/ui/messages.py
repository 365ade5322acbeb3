"""Messages the render worker posts to the app: the engine's events (wrapped), the finished render,
and a failure (with the one line the user sees)."""

from __future__ import annotations

from pathlib import Path

from textual.message import Message

from ..engine.events import Event, MemorySample, StepDone
from ..errors import classify, log_traceback, traceback_text


class EngineEvent(Message):
    """One engine event. Progress and memory samples may replace a queued older one of the same
    kind, so a fast GPU never floods the screen with updates it can't draw anyway."""

    def __init__(self, event: Event, render_id: int) -> None:
        super().__init__()
        self.event = event
        self.render_id = render_id

    def can_replace(self, message: Message) -> bool:
        return (
            isinstance(message, EngineEvent)
            and isinstance(self.event, (StepDone, MemorySample))
            and type(message.event) is type(self.event)
            and message.render_id == self.render_id
        )


class RenderDone(Message):
    def __init__(self, render_id: int, result, path: str | None, error: str | None) -> None:
        super().__init__()
        self.render_id = render_id
        self.result = result
        self.path = path
        self.error = error
        """Saving failed: the image is kept in memory (and at ``path`` if a rescue copy worked)."""


class RenderFailed(Message):
    def __init__(self, render_id: int, message: str, cancelled: bool = False, *,
                 traceback: str | None = None, log=None) -> None:
        super().__init__()
        self.render_id = render_id
        self.message = message
        self.cancelled = cancelled
        self.traceback = traceback
        """Set for an internal error (a bug): its traceback, for --debug to print after the app exits."""
        self.log = log
        """The error log the traceback was appended to (None when it could not be written)."""

    @classmethod
    def from_exception(cls, exc: BaseException, render_id: int, print_tracebacks: bool) -> "RenderFailed":
        """The message for a render that raised ``exc`` (on the worker thread): the user's one line
        for a known failure; a bug's traceback goes to the error log, and its line says so."""
        failure = classify(exc)
        if failure.kind == "cancelled":
            return cls(render_id, "cancelled: nothing was written", cancelled=True)
        if not failure.internal:
            return cls(render_id, failure.line)
        log = log_traceback(exc, "in a render")
        if log is not None:
            where = f"traceback in {_short_path(log)}"
        elif print_tracebacks:
            where = "traceback printed when sdterm exits"
        else:
            where = "restart with --debug for the traceback"
        # What matters comes first: the notice line is one row, cut at the terminal's width.
        return cls(render_id, f"internal error (a bug; {where}): {failure.line}", traceback=traceback_text(exc), log=log)


def _short_path(path: Path) -> str:
    """``path`` with the home folder as ``~`` (the notice line is short)."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except (ValueError, RuntimeError):
        return str(path)
