"""The prompt box: Enter renders, Up/Down walk through earlier prompts."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input


class PromptInput(Input):
    BINDINGS = [
        Binding("up", "recall_older", "earlier prompt", show=False),
        Binding("down", "recall_newer", "later prompt", show=False),
    ]

    class Recall(Message):
        def __init__(self, direction: int) -> None:
            super().__init__()
            self.direction = direction

    def action_recall_older(self) -> None:
        self.post_message(self.Recall(-1))

    def action_recall_newer(self) -> None:
        self.post_message(self.Recall(+1))
