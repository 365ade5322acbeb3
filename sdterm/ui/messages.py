"""Messages the render worker posts to the app (the engine's events, wrapped)."""

from __future__ import annotations

from textual.message import Message

from ..engine.events import Event, MemorySample, StepDone


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
