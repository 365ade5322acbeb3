"""The prompt box: Enter renders, Up/Down walk through earlier prompts, a slash command's name
completes from the command registry (Right arrow takes the completion).

Keys take effect in the order they arrive, also in a burst (type-ahead over a slow link, keys and a
paste read from the terminal in one go). Textual does not guarantee that by itself: a printable key
is inserted by ``Input._on_key`` when the box takes the key from its queue, but a key bound to an
action (BackSpace, Ctrl+U, End, Enter, ...) is not handled there; the event bubbles (each hop a
``post_message`` onto the parent's queue) up to ``App._on_key``, which only then runs
``App._check_bindings``. Meanwhile the box has already inserted the characters queued behind it,
so ``Ctrl+U /cfg 4 Enter`` typed ahead became "insert /cfg 4, clear, submit an empty box" or worse.
:meth:`PromptInput._on_key` therefore runs the box's own bindings at once, in arrival order (the
check ``App._check_bindings`` would make, only before the event bubbles).
"""

from __future__ import annotations

from collections.abc import Callable

from textual import events
from textual.binding import Binding
from textual.suggester import Suggester
from textual.widgets import Input

from ...commands import CommandError, complete, parse_command


class CommandSuggester(Suggester):
    """Completes ``/st`` to ``/steps `` from :data:`sdterm.commands.COMMANDS`."""

    async def get_suggestion(self, value: str) -> str | None:
        return complete(value)


class PromptInput(Input):
    BINDINGS = [
        Binding("up", "recall_older", "earlier prompt", show=False),
        Binding("down", "recall_newer", "later prompt", show=False),
    ]

    def __init__(self, *, recall: Callable[[int], None] | None = None, **kwargs) -> None:
        """``recall(direction)``: Up (-1) / Down (+1), called at the key itself, so that a recalled
        prompt is in the box before the keys typed after it (a message would arrive after them)."""
        kwargs.setdefault("suggester", CommandSuggester())
        super().__init__(**kwargs)
        self._on_recall = recall

    async def _on_key(self, event: events.Key) -> None:
        # A printable key is Input's own (inserted by Input._on_key, never a binding: "?" types "?").
        if event.is_printable:
            return
        # Any other key bound in this box (editing keys, Enter, Up/Down): run its action now, in
        # arrival order, exactly as App._check_bindings would once the event had bubbled up to the
        # app (keymap applied, check_action honoured). Keys bound further up (Esc, Ctrl+R) keep
        # Textual's own path; priority bindings already ran before the key was forwarded here.
        for namespace, bindings in self.screen._modal_binding_chain:
            if namespace is not self:
                continue
            for binding in bindings.key_to_bindings.get(event.key, ()):
                if not binding.priority and await self.app.run_action(binding.action, self):
                    self._restart_blink()
                    event.stop()
                    event.prevent_default()  # done: Input._on_key and the bubbling are skipped
                    return
            return

    def action_submit(self) -> None:  # not async (Input's is): the app calls it directly too
        """Enter: submit the text as typed up to this key. A well-formed slash command is cleared
        from the box here, in key order, so that keys typed after the Enter start the next line
        (the app, handling the Submitted message later, must not clear the box again)."""
        value = self.value
        try:
            command = parse_command(value)
        except CommandError:
            command = None  # kept in the box, to be corrected; the app says what is wrong
        if command is not None:
            self.value = ""
        validation = self.validate(value) if "submitted" in self.validate_on else None
        self.post_message(self.Submitted(self, value, validation))

    def action_recall_older(self) -> None:
        if self._on_recall is not None:
            self._on_recall(-1)

    def action_recall_newer(self) -> None:
        if self._on_recall is not None:
            self._on_recall(+1)
