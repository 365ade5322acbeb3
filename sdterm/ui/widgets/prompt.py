"""The prompt box: Enter renders, Up/Down walk through earlier prompts, a slash command's name
completes from the command registry (Right arrow takes the completion)."""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.suggester import Suggester
from textual.widgets import Input

from ...commands import complete


class CommandSuggester(Suggester):
    """Completes ``/st`` to ``/steps `` from :data:`sdterm.commands.COMMANDS`."""

    async def get_suggestion(self, value: str) -> str | None:
        return complete(value)


class PromptInput(Input):
    BINDINGS = [
        Binding("up", "recall_older", "earlier prompt", show=False),
        Binding("down", "recall_newer", "later prompt", show=False),
    ]

    class Recall(Message):
        def __init__(self, direction: int) -> None:
            super().__init__()
            self.direction = direction

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("suggester", CommandSuggester())
        super().__init__(**kwargs)

    def action_recall_older(self) -> None:
        self.post_message(self.Recall(-1))

    def action_recall_newer(self) -> None:
        self.post_message(self.Recall(+1))
