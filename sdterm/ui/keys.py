"""The app's keys outside the prompt box: the seed and variation keys and Enter on the image, the
contact sheet's pick, zoom, focus, cancel, help and history search (a mixin of
:class:`~sdterm.ui.app.SdtermApp`), and showing an image file or a render made before."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from rich.text import Text
from textual.command import CommandPalette

from ..commands import Command
from ..errors import ConfigError
from ..params import Params
from ..session import VARIATION_STEP
from .screens import HelpScreen, HistoryProvider, SamplerScreen
from .widgets.image_view import ImageView

REUSE_LIMIT = 64
"""How many finished renders (request -> image file) the seed keys may show again without rendering."""


class Keys:
    """Mixin: actions bound to keys (the bindings are the app's and the image view's)."""

    # ---- seed, variation, render again ---------------------------------------------------------

    def action_nudge(self, delta: int) -> None:
        self.render_request(self.session.nudge_seed(delta), reuse=True)
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
        self.render_request(req, reuse=True)
        self.refresh_params()

    # Textual's @on is not seen on a mixin: these handlers go by its naming convention.

    def on_image_view_rerender_requested(self, message: ImageView.RerenderRequested) -> None:
        self.action_rerender()

    def action_rerender(self) -> None:
        """Enter on the image: the last prompt again with the settings as they are now."""
        self.render_request(self.session.rerender())

    def action_refine(self) -> None:
        """i on the image: the image shown becomes the init image (as ``/init``) and its prompt
        renders again at the current strength: img2img, iterating on one picture (``/init off``
        goes back to noise). With the hires fix on, the hires fix goes off and the size becomes the
        image's own (img2img of the big image shown, as A1111 has no hires fix in img2img)."""
        if self.session.last_prompt is None or not self.session.last_path:
            self.notice("no image yet: render one, then i refines it", "warning")
            return
        after = ""
        if self.session.params.hires:
            try:
                with Image.open(self.session.last_path) as im:
                    width, height = im.size
                self.session.set(hires_scale=0.0, hires_width=0, hires_height=0, width=width, height=height)
            except (OSError, ValueError) as exc:  # CommandError is a ValueError
                self.notice(f"i: the hires fix stays on: {exc}", "error")
                return
            after = f" · hires fix off: img2img at the image's {width}×{height}"
            # the notice line gives way to the render's at once: a toast keeps it in sight
            self.notify(after.removeprefix(" · "), severity="warning", markup=False)
        self.run_command(Command("init", str(self.session.last_path)), after)
        if Path(self.session.params.init_image) == Path(self.session.last_path).resolve():
            self.render_request(self.session.rerender())
        self.refresh_params()

    def action_draft(self) -> None:
        """F2 anywhere, d on the image: draft mode on / off (as ``/draft``)."""
        self.run_command(Command("draft", ""))

    def action_full_quality(self) -> None:
        """F3 anywhere, f on the image: the image shown (its prompt, seed, size) again with the full
        settings; draft mode stays on. One image, also when ``/n`` makes batches."""
        try:
            req = self.session.full_quality()
        except ConfigError as exc:
            self.notice(str(exc), "error")
            return
        self.render_request(req, reuse=True, single=True)
        self.refresh_params()

    def on_image_view_picked(self, message: ImageView.Picked) -> None:
        """Enter on a contact sheet's image: its settings become the session's; it is shown alone."""
        sheet = self._sheet or []
        if not 0 <= message.index < len(sheet):
            return
        params, image, path = sheet[message.index]
        self.restore_params(params, focus=False)
        self._sheet = None
        self.query_one(ImageView).show(image, f"seed {params.seed} · {params.width}×{params.height}")
        if path:
            self.session.last_path = path
        self.notice(f"picked seed {params.seed}: the seed keys and Enter work on it")

    # ---- screen ----------------------------------------------------------------------------

    def action_zoom(self) -> None:
        """z: the image fills the screen (the prompt and the stage panel hidden), z again brings them back."""
        self.screen.toggle_class("zoomed")
        if self.screen.has_class("zoomed"):
            self.screen.set_focus(self.query_one(ImageView))

    def action_focus_cycle(self, direction: int) -> None:
        if self.screen.has_class("zoomed"):
            self.screen.remove_class("zoomed")
        order = [self.query_one("#prompt"), self.query_one(ImageView), self.query_one("#negative")]
        focused = self.focused
        index = order.index(focused) if focused in order else -1
        # Screen.set_focus at once, not Widget.focus() (which defers it with call_later): a key
        # typed right after Tab must go to the newly focused widget (`Tab ]` in one burst).
        self.screen.set_focus(order[(index + direction) % len(order)])

    def action_cancel(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self._pending = []
        self._job = []
        if self._cancel is not None:
            self._cancel.set()
            self.notice("cancelling at the next step…", "warning")

    def action_pick_sampler(self) -> None:
        """``s`` on the image: a list of the samplers; Enter sets one, as ``/sampler NAME`` does."""
        if not isinstance(self.screen, SamplerScreen):
            self.push_screen(SamplerScreen(self.session.params.sampler,
                                           lambda name: self.run_command(Command("sampler", name))))

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
        self._pending = []
        self._job = []
        if self._cancel is not None:
            self._cancel.set()
        self.exit()

    # ---- images already made ----------------------------------------------------------------

    @staticmethod
    def _same_image(req: Params) -> Params:
        """``req`` with what doesn't change its pixels made equal (the variation seed at strength 0)."""
        return req.replace(subseed=0) if req.subseed_strength == 0 else req

    def _remember(self, req: Params, path: str) -> None:
        req = self._same_image(req)
        self._rendered.pop(req, None)
        self._rendered[req] = path
        while len(self._rendered) > REUSE_LIMIT:
            self._rendered.pop(next(iter(self._rendered)))

    def show_existing(self, req: Params) -> bool:
        """Show the image this model already rendered for ``req`` (same prompt, seed, settings)
        instead of rendering it again; False when there is none (or its file is gone)."""
        path = self._rendered.get(self._same_image(req))
        if path is None:
            return False
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError:
            self._rendered.pop(self._same_image(req), None)
            return False
        self.query_one(ImageView).show(image, f"seed {req.seed} · {req.width}×{req.height} · already rendered")
        self._sheet = None
        self.session.last_path = path
        self.refresh_params()
        self.notice(f"already rendered: {path} (Enter on the image renders it again)")
        return True

    def show_image_file(self, path: str) -> None:
        """``/open``: the image at ``path`` in the image panel, its path as a link on the notice line."""
        file = Path(path).expanduser()
        try:
            with Image.open(file) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as exc:
            self.notice(f"cannot open {path}: {getattr(exc, 'strerror', None) or exc}", "error")
            return
        self._sheet = None
        self.query_one(ImageView).show(image, f"{file.name} · {image.width}×{image.height}")
        text = Text("showing ")
        text.append(str(file), style=f"link {file.resolve().as_uri()}")
        self.notice(text)
