"""What the prompt box does in the app (a mixin of :class:`~sdterm.ui.app.SdtermApp`): Enter renders
a prompt or runs a slash command, Up/Down recall earlier prompts, a pasted parameters block or a
PNG's parameters (``/load``) and an earlier render (``!N``, the history search) set everything.

Recalling with Up/Down brings back an earlier prompt and negative prompt only: the settings changed
since (steps, CFG, size, seed lock) stay as they are, so walking through history never undoes them.
The history search (Ctrl+R), ``!N``, ``/load`` and a pasted A1111 block restore that render's
settings too, and say so. See ``sdterm/ui/widgets/prompt.py`` for how a command and a prompt share
the box.
"""

from __future__ import annotations

import re
from pathlib import Path

from textual.widgets import Input

from ..commands import Command, CommandError, Outcome, parse_command
from ..errors import ConfigError
from ..history import Recall
from ..infotext_hires import hires_notes
from ..params import Params
from ..units import format_bytes
from .screens import HistoryScreen, summary
from .widgets.prompt import PromptInput
from .widgets.token_line import TokenLine

def split_trailing_command(text: str) -> tuple[str, Command] | None:
    """``("a cat", Command("steps", "50"))`` for ``"a cat /steps 50"``: a known command's name after a
    blank at the end of a prompt (CommandError when its value is malformed); None when the text
    doesn't end in a command (``"AC/DC"``, ``"a cat /b"``)."""
    for match in reversed(list(re.finditer(r"\s/", text))):
        tail = text[match.start() + 1 :]
        try:
            command = parse_command(tail)
        except CommandError as exc:
            if str(exc).startswith("unknown command"):
                continue
            raise
        if command is not None:
            return text[: match.start()].rstrip(), command
    return None


class PromptFlow:
    """Mixin: the prompt box, the commands and the recall of earlier renders."""

    def init_prompt_flow(self, session) -> None:
        self.recall = Recall(session.history)

    @property
    def prompt_box(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    # ---- Enter -------------------------------------------------------------------------------

    # Textual's @on is not seen on a mixin (only on the App's own class): the handlers here go by
    # Textual's naming convention instead, which it looks up along the whole MRO.

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "prompt":
            self._submitted(event.value)
        elif event.input.id == "negative":
            self._negative_submitted()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "negative":
            self.session.set_negative(event.value)
        else:
            self.show_params()  # the prompt's LoRAs, live
        self.refresh_tokens()

    def on_descendant_focus(self, event) -> None:
        self.refresh_tokens()  # into or out of the negative prompt box

    # ---- the token line ----------------------------------------------------------------------

    def refresh_tokens(self) -> None:
        """The token line under the prompt box describes the prompt, or the negative prompt while
        that box has the focus, for the current steps, sampler and model."""
        if not self.screen_stack or self.screen is not self.screen_stack[0]:
            return  # a modal screen is up (queries would look there); closing it refocuses a box
        negative = self.query_one("#negative", Input)
        box = negative if self.focused is negative else self.prompt_box
        p = self.session.render_settings
        self.query_one(TokenLine).describe(self.engine, box.value, steps=p.steps, sampler=p.sampler,
                                           negative=box is negative, loading=self._loading is not None)

    def _submitted(self, text: str) -> None:
        try:
            command = parse_command(text)
            trailing = split_trailing_command(text) if command is None else None
        except CommandError as exc:
            self.notice(str(exc), "error")
            return
        if command is not None:  # PromptInput cleared the box at the Enter, in key order
            self.run_command(command)
            return
        if trailing is not None:  # "a cat /steps 50": run the command, keep the prompt, render nothing
            prompt, command = trailing
            self.prompt_box.hold(prompt)
            self.run_command(command, after=" — the prompt is back in the box: Enter renders it")
            return
        self.session.set_negative(self.query_one("#negative", Input).value)
        try:
            if self.session.recalled and text == self.session.last_prompt:
                # A render recalled with its settings runs again as it was, seed included.
                req = self.session.rerun(text)
            else:
                req = self.session.new_prompt(text)
        except ConfigError as exc:
            self.notice(str(exc), "error")
            return
        self.recall.reset()
        self.render_request(req)

    def _negative_submitted(self) -> None:
        prompt = self.prompt_box.value
        if prompt and not prompt.startswith("/"):
            self.prompt_box.action_submit()

    # ---- recall ------------------------------------------------------------------------------

    def recall_step(self, direction: int) -> None:
        """Up (-1) / Down (+1) in the prompt box; PromptInput calls it at the key, in key order. The
        prompt and negative prompt come back; the settings stay as they are."""
        box = self.prompt_box
        entry = self.recall.older(box.value) if direction < 0 else self.recall.newer()
        if entry is None:
            return
        if isinstance(entry, str):  # back to the draft being typed
            box.value = entry
            box.cursor_position = len(entry)
            return
        params = self.session.undraft(entry.params)  # a draft's prompt without the tag the draft added
        box.hold(params.prompt)
        self.query_one("#negative", Input).value = params.negative
        self.session.set_negative(params.negative)
        if self._settings_differ(params):
            self.notice(f"earlier prompt; your settings kept (it had {summary(params)}; Ctrl+R or "
                        "/history restores them)")

    def _settings_differ(self, params: Params) -> bool:
        mine = self.session.params
        return any(getattr(mine, name) != getattr(params, name) for name in ("steps", "cfg", "width", "height", "eta"))

    def restore_params(self, params: Params, focus: bool = True, *, what: str = "recalled") -> None:
        """Put an earlier render's prompt and all its settings back (history search, ``!N``,
        ``/load``, a pasted parameters block, a contact sheet's pick); the seed keys then tweak it.
        A draft render comes back with the full settings (``Session.restore``). ConfigError, with
        nothing changed, when it can't be rendered."""
        if self.session.is_draft(params):
            what += " (a draft: your full settings, draft mode as it is)"
        self.session.restore(params)
        params = self.session.params.replace(prompt=self.session.last_prompt)
        self.prompt_box.hold(params.prompt)
        self.query_one("#negative", Input).value = params.negative
        self.refresh_params()
        self.notice(f"{what}: {summary(params)} — Enter renders it")
        if focus:
            self.prompt_box.focus()

    def paste_block(self, text: str) -> bool:
        """A pasted block of several lines: AUTOMATIC1111's parameters (a ``Negative prompt:`` line or
        a ``Steps: ...`` settings line) set the prompt and every setting they name; False for other text."""
        from ..pngmeta import MetadataError, parse_settings_line, params_from_infotext

        lines = text.strip().splitlines()
        negative = any(line.lstrip().startswith("Negative prompt:") for line in lines)
        if not negative and len(parse_settings_line(lines[-1])[0]) < 3:
            return False
        try:
            found = params_from_infotext(text.strip())
        except MetadataError:
            return False
        return self._restore_found(found, "pasted parameters")

    def _restore_found(self, found, what: str) -> bool:
        """Restore the parameters an image or a pasted block recorded (what sdterm can't do of its
        hires fix, an ESRGAN upscaler for one, said on the notice line). The basic settings it didn't
        record (a partial paste, a sampler sdterm lacks) keep the session's values; any other
        setting it leaves out takes its default, as A1111 reads a missing key (no "Eta DDIM": 0, no
        "Variation seed": none, no "ENSD": 0)."""
        mine = self.session.params
        kept = ("seed", "steps", "cfg", "width", "height", "sampler", "schedule")
        params = found.params.replace(**{name: getattr(mine, name) for name in kept if found.get(name) is None})
        try:
            self.restore_params(params, what=what)
        except ConfigError as exc:
            self.notice(f"{what}: {exc}", "error")
            return True
        if found.sampler and found.get("sampler") is None:
            self.notice(f"{what}: {summary(params)} — sampler {found.sampler} is not one sdterm has: "
                        f"{params.sampler} will be used; Enter renders it", "warning")
        elif hires := hires_notes(found.extra, found.params.hires):  # as sdterm show notes them
            self.notice(f"{what}: {summary(params)} — " + "; ".join(hires), "warning")
        return True

    # ---- commands ----------------------------------------------------------------------------

    def run_command(self, command: Command, after: str = "") -> None:
        """A slash command: its registry entry's handler (in the session), then what it asks of the app."""
        try:
            outcome = self.session.apply(command)
        except CommandError as exc:
            self.notice(str(exc), "error")
            return
        effects = {
            "quit": lambda o: self.action_quit(),
            "help": lambda o: self.action_help(),
            "open": lambda o: self.show_image_file(o.message),
            "cache": lambda o: self.notice(cache_stats_line(self.engine)),
            "load": lambda o: self.load_image_parameters(o.message),
            "budget": self._budget_changed,
            "history": lambda o: self.push_screen(HistoryScreen(self.session.history, int(o.message or 20),
                                                                self.restore_params)),
            "recall": self._recall_entry,
            "model": self._model_command,
            "vae": self.vae_command,
            "lora": self.lora_command,
            "verify": self.verify_command,
            "fork": self.fork_command,
        }
        effect = effects.get(outcome.action)
        if effect is not None:
            effect(outcome)
        elif outcome.message:
            self.notice(outcome.message + after)
        self.query_one("#negative", Input).value = self.session.params.negative
        self.refresh_params()

    def _recall_entry(self, outcome: Outcome) -> None:
        number, entry = self.session.recall_entry(outcome.message)
        try:
            self.restore_params(entry.params, what=f"history !{number}")
        except ConfigError as exc:
            self.notice(f"history !{number}: {exc}", "error")

    def _model_command(self, outcome: Outcome) -> None:
        if outcome.message:
            self.switch_model(outcome.message)
            return
        names = self.model_names()
        current = self.engine.source.name if self.engine is not None else "none"
        listed = ", ".join(names) if names else "none in the models folder"
        self.notice(f"model {current}; /model NAME loads one of: {listed}")

    def _budget_changed(self, outcome: Outcome) -> None:
        message = outcome.message
        if self.engine is not None and self.engine.device.type != "cuda":  # kept, but nothing is placed on a CPU
            message += ": no effect here, rendering on the CPU"
        if self.busy:
            self._pending_budget = (True, self.session.budget)
            self.notice(message + " (after this render)")
        else:
            if self.engine is not None:
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
        self._restore_found(found, f"loaded from {path}")
        self.follow_image_vae(found.vae)


def cache_stats_line(engine) -> str:
    cache = engine.cache if engine is not None else None
    if cache is None:
        return "embedding cache: off" if engine is not None else "embedding cache: no model loaded yet"
    st = cache.stats()
    # The same figures, in the same units, as `sdterm doctor` and `sdterm cache stats`.
    return f"embedding cache {cache.folder}: {st.entries} entries, {format_bytes(st.bytes)} of {format_bytes(cache.max_bytes)}"
