"""Add-on weights in the app (a mixin of :class:`~sdterm.ui.app.SdtermApp`): ``/vae`` switches the
loaded engine's VAE on a worker (after the render in flight, as ``/model``), ``/lora`` edits the
prompt box's ``<lora:NAME:W>`` tags, and the parameter line shows the VAE in use and the LoRAs of
the prompt being typed, live (a bad tag's one-line error instead). The completion of both commands
lists the files of the vae and loras folders."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import work

from .. import paths
from ..file_values import folder_files
from ..lora_edit import edit_loras
from ..session import describe_networks
from .messages import VaeSwitched, failure_line

VAE_FILES = (".safetensors", ".ckpt", ".pt")
LORA_FILES = (".safetensors", ".pt", ".ckpt", ".bin")


def vae_values(typed: str) -> list[str]:
    """``/vae``'s completion: the files of the vae folder, and ``default``."""
    return [*folder_files(paths.vae_dir(), VAE_FILES), "default"]


def lora_values(typed: str) -> list[str]:
    """``/lora``'s completion: the names (file stems) of the loras folder; ``-NAME`` after a minus."""
    names = [Path(name).stem for name in folder_files(paths.lora_dir(), LORA_FILES)]
    return ["-" + n for n in names] if typed.startswith("-") else names


class Addons:
    """Mixin: ``/vae``, ``/lora`` and their part of the parameter line."""

    _vae_switch: bool = False
    """True while the VAE worker runs: renders wait for it (the app counts it as busy)."""
    _pending_vae: tuple[bool, Path | None] = (False, None)
    """(asked, path): a ``/vae`` given during a render, applied when it ends."""

    def vae_name(self) -> str | None:
        """The loaded engine's VAE file name; None for the checkpoint's own (or no engine)."""
        return getattr(getattr(self.engine, "models", None), "vae_name", None)

    def params_text(self, line: str) -> Text:
        """The parameter line: ``line`` (draft mode's head in reverse video), the VAE in use and
        the LoRAs of the prompt box's text. User text (names, tags) only through Text.append."""
        text = Text()
        if self.session.draft:
            head, sep, rest = line.partition(" · ")
            text.append(head, style="bold reverse")
            text.append(sep + rest)
        else:
            text.append(line)
        if self.vae_name():
            text.append(" · VAE ")
            text.append(self.vae_name())
        box = self.prompt_box.value if self.is_mounted else ""
        if not box.startswith("/"):
            networks, bad = describe_networks(box)
            if networks:
                text.append(" · ")
                text.append(networks, style="bold red" if bad else "")
        return text

    # ---- /vae ----------------------------------------------------------------------------------

    def vae_command(self, outcome) -> None:
        from ..resolve import resolve_vae

        arg = outcome.message.strip()
        if not arg:
            listed = ", ".join(vae_values("")[:-1]) or f"none in {paths.vae_dir()}"
            self.notice(f"VAE {self.vae_name() or 'the model’s own'}; /vae NAME uses one of: {listed}; "
                        "/vae default: the model’s own")
            return
        path = None if arg.lower() in ("default", "none") else resolve_vae(arg)
        if self.engine is None:
            self.notice("no model loaded yet: /vae once it is ready", "warning")
        elif self.busy:
            self._pending_vae = (True, path)
            self.notice(f"switching the VAE to {path.name if path else 'the model’s own'} after this render")
        else:
            self.begin_vae(path)

    def follow_image_vae(self, vae: str | None) -> None:
        """After ``/load``: an image decoded with a VAE file (its infotext's ``VAE:``) switches to
        that file when the vae folder has it (as A1111 applies an infotext's VAE), and says so when
        it hasn't; an image without one leaves the VAE as it is."""
        from ..commands import Outcome
        from ..resolve import resolve_vae

        if not vae or vae == self.vae_name():
            return
        path = resolve_vae(Path(vae).name)  # a name in the vae folder, never a path from the image
        if path is None or not path.is_file():
            self.notice(f"the image was decoded with VAE {Path(vae).name}, which is not in {paths.vae_dir()}: "
                        f"renders use {self.vae_name() or 'the model’s own'}", "warning")
            return
        self.vae_command(Outcome("vae", str(path)))

    def begin_vae(self, path: Path | None) -> None:
        """Switch the engine's VAE on a worker; renders asked for meanwhile wait for it."""
        self._vae_switch = True
        self.notice(f"switching the VAE to {path.name if path else 'the model’s own'}…")
        self._vae_worker(path)

    @work(thread=True, group="vae", exclusive=True)
    def _vae_worker(self, path: Path | None) -> None:
        from ..engine.loading.checkpoint import CheckpointError

        try:
            self.engine.set_vae(path)
        except (CheckpointError, OSError) as exc:  # an unusable file: its one line
            self.post_message(VaeSwitched(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            return
        except Exception as exc:  # a bug: one line, the traceback kept as a render's is
            line, tb, log = failure_line(exc, self.print_tracebacks, "switching the VAE")
            self.post_message(VaeSwitched(line, tb, log))
            return
        self.post_message(VaeSwitched())

    def on_vae_switched(self, message: VaeSwitched) -> None:
        self._vae_switch = False
        if message.traceback is not None:
            self.internal_errors.append(message.traceback)
            self.error_log = message.log or self.error_log
        if message.error:
            self.notice(message.error, "error")
        else:
            self.notice(f"VAE: {self.vae_name() or 'the model’s own'} (the next render decodes with it)")
        self.refresh_params()
        self._finished()  # what waited for the switch: a queued render, a model, a budget

    def take_pending_vae(self) -> bool:
        """After a render: start the ``/vae`` asked for during it; True when one started."""
        asked, path = self._pending_vae
        self._pending_vae = (False, None)
        if asked and self.engine is not None:
            self.begin_vae(path)
        return asked and self.engine is not None

    # ---- /lora ---------------------------------------------------------------------------------

    def lora_command(self, outcome) -> None:
        box = self.prompt_box
        text = box.stashed if box.stashed is not None else box.value
        try:
            prompt, message = edit_loras(text, outcome.message)
        except ValueError as exc:
            self.notice(str(exc), "error")
            return
        box.hold(prompt)
        name = outcome.message.lstrip("-").rpartition(":")[0] or outcome.message.lstrip("-")
        known = {Path(n).stem for n in folder_files(paths.lora_dir(), LORA_FILES)}
        if not outcome.message.startswith("-") and name not in known:
            message += f" (no {name} in {paths.lora_dir()} yet)"
        self.notice(message)
