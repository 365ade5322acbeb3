"""The prompt box: Enter renders, Up/Down walk through earlier prompts, a slash command's name (and
its value, where the registry says what it takes) completes from the command registry (Right arrow
takes the completion).

How a prompt and a command share the box, so that neither can turn into the other by accident:

* After Enter (or a recall) the box keeps the finished prompt, to be edited or rendered again. A
  ``/`` typed then, before any other key, starts a command line: the prompt moves aside (named under
  the box) and comes back after the command runs. Backspace over the bare ``/`` or Esc brings it
  back at once. So ``/steps 50`` typed after a render changes the steps; it is never appended to the
  prompt and rendered as text.
* The box never selects its text when it gets the focus (Tab back into it), so the next key edits
  the prompt instead of replacing it.
* ``?`` in an empty box opens the help (anywhere else it is text; F1 opens it from anywhere).
* A paste of several lines is never cut to its first line: an AUTOMATIC1111 parameters block
  (prompt, ``Negative prompt:`` line, ``Steps: ...`` line) goes to the app's ``paste`` callback, which
  loads all of it; other text is joined into one line.

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

from collections.abc import Callable, Mapping

from textual import events
from textual.binding import Binding
from textual.suggester import Suggester
from textual.widgets import Input

from ...commands import CommandError, complete, parse_command
from ..text import plain


class CommandSuggester(Suggester):
    """Completes ``/st`` to ``/steps `` and a command's value (``/model de`` -> ``/model demo``)
    from :data:`sdterm.commands.COMMANDS`; ``values`` names the candidates of each kind of value."""

    def __init__(self, values: Mapping[str, Callable[[str], list[str]]] | None = None) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.values = values or {}

    async def get_suggestion(self, value: str) -> str | None:
        return complete(value, self.values)


class PromptInput(Input):
    BINDINGS = [
        Binding("up", "recall_older", "earlier prompt", show=False),
        Binding("down", "recall_newer", "later prompt", show=False),
    ]

    def __init__(self, *, recall: Callable[[int], None] | None = None, paste: Callable[[str], bool] | None = None,
                 help: Callable[[], None] | None = None, values: Mapping[str, Callable[[str], list[str]]] | None = None,
                 **kwargs) -> None:
        """``recall(direction)``: Up (-1) / Down (+1), called at the key itself, so that a recalled
        prompt is in the box before the keys typed after it (a message would arrive after them).
        ``paste(text)``: a pasted block of several lines; True when it was taken as parameters.
        ``help()``: ``?`` in an empty box. ``values``: completion candidates by kind of value."""
        kwargs.setdefault("suggester", CommandSuggester(values))
        kwargs.setdefault("select_on_focus", False)
        super().__init__(**kwargs)
        self._on_recall = recall
        self._on_paste_block = paste
        self._on_help = help
        self.stashed: str | None = None
        """The prompt moved aside while a command line is typed (None when there is none)."""
        self.finished = False
        """True while the box holds a finished prompt (after Enter or a recall), before any other key."""

    # ---- the finished prompt and the command line ---------------------------------------------

    def hold(self, text: str) -> None:
        """Put a finished prompt in the box (a recall, a load): a ``/`` typed next starts a command."""
        self.value = text
        self.cursor_position = len(text)
        self.finished = True

    def _stash(self) -> None:
        self.stashed = self.value
        self.value = "/"
        self.cursor_position = 1
        self.border_subtitle = plain(f"prompt kept: {self.stashed[:60]} (Esc brings it back)")

    def unstash(self) -> None:
        """The prompt moved aside comes back (after the command ran, or Esc)."""
        if self.stashed is not None:
            text, self.stashed = self.stashed, None
            self.border_subtitle = None
            self.hold(text)

    def _drop_stash(self) -> None:
        self.stashed = None
        self.border_subtitle = None

    # ---- keys --------------------------------------------------------------------------------

    async def _on_key(self, event: events.Key) -> None:
        finished, self.finished = self.finished, False
        if event.character == "/" and finished and self.value and not self.value.startswith("/"):
            self._stash()
            event.stop()
            event.prevent_default()
            return
        if event.character == "?" and not self.value and self._on_help is not None:
            self._on_help()
            event.stop()
            event.prevent_default()
            return
        if event.key == "escape" and self.stashed is not None:
            self.unstash()
            event.stop()
            event.prevent_default()
            return
        # A printable key is Input's own (inserted by Input._on_key, never a binding: "?" types "?").
        if event.is_printable:
            return
        await self._run_binding(event)
        if self.stashed is not None and not self.value:
            if event.key == "backspace":
                self.unstash()  # Backspace over the bare "/": the prompt comes back
            else:
                self._drop_stash()  # Ctrl+U and the like: the box is cleared for good

    async def _run_binding(self, event: events.Key) -> None:
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

    def _on_paste(self, event: events.Paste) -> None:
        self.finished = False
        lines = [line for line in event.text.splitlines() if line.strip()]
        if len(lines) > 1:
            event.stop()
            event.prevent_default()  # Input._on_paste would keep the first line only
            if self._on_paste_block is not None and self._on_paste_block(event.text):
                return
            text = " ".join(line.strip() for line in lines)
            selection = self.selection
            if selection.is_empty:
                self.insert_text_at_cursor(text)
            else:
                self.replace(text, *selection)

    def action_submit(self) -> None:  # not async (Input's is): the app calls it directly too
        """Enter: submit the text as typed up to this key. A well-formed slash command is cleared
        from the box here, in key order (the prompt moved aside comes back), so that keys typed
        after the Enter start the next line (the app, handling the Submitted message later, must
        not touch the box again); a prompt stays, finished."""
        value = self.value
        try:
            command = parse_command(value)
        except CommandError:
            command = None  # kept in the box, to be corrected; the app says what is wrong
            self.finished = False
        else:
            if command is not None:
                self.value = ""
                if self.stashed is not None:
                    self.unstash()
            else:
                self.finished = True
        validation = self.validate(value) if "submitted" in self.validate_on else None
        self.post_message(self.Submitted(self, value, validation))

    def action_recall_older(self) -> None:
        if self._on_recall is not None:
            self._on_recall(-1)

    def action_recall_newer(self) -> None:
        if self._on_recall is not None:
            self._on_recall(+1)
