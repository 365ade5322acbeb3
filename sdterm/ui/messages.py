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
        if classify(exc).kind == "cancelled":
            return cls(render_id, "cancelled: nothing was written", cancelled=True)
        line, tb, log = failure_line(exc, print_tracebacks, "in a render")
        return cls(render_id, line, traceback=tb, log=log)


class ModelLoaded(Message):
    """The model (and its engine, in a render service) is ready."""

    def __init__(self, service, seconds: float) -> None:
        super().__init__()
        self.service = service
        self.seconds = seconds


class ModelFailed(Message):
    """The model could not be loaded: the one line, and a bug's traceback (as :class:`RenderFailed`)."""

    def __init__(self, message: str, traceback: str | None = None, log=None) -> None:
        super().__init__()
        self.message = message
        self.traceback = traceback
        self.log = log


class LoadProgress(Message):
    """What the model loader is doing now ("reading the checkpoint", ...)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


def failure_line(exc: BaseException, print_tracebacks: bool, where: str) -> tuple[str, str | None, Path | None]:
    """The notice line for ``exc`` raised on a worker thread, and for a bug its traceback and the
    error log it was appended to: a known failure is the user's one line; a bug says it is one."""
    failure = classify(exc)
    if not failure.internal:
        return failure.line, None, None
    log = log_traceback(exc, where)
    if log is not None:
        place = f"traceback in {_short_path(log)}"
    elif print_tracebacks:
        place = "traceback printed when sdterm exits"
    else:
        place = "restart with --debug for the traceback"
    # What matters comes first: the notice line is one row, cut at the terminal's width.
    return f"internal error (a bug; {place}): {failure.line}", traceback_text(exc), log


def _short_path(path: Path) -> str:
    """``path`` with the home folder as ``~`` (the notice line is short)."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except (ValueError, RuntimeError):
        return str(path)


class VaeSwitched(Message):
    """``/vae`` finished on its worker: ``error`` is None when the engine took the VAE, else the
    one line that says why not (``traceback``: a bug's, as :class:`RenderFailed`)."""

    def __init__(self, error: str | None = None, traceback: str | None = None, log=None) -> None:
        super().__init__()
        self.error = error
        self.traceback = traceback
        self.log = log
