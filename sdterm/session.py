"""The state of an interactive sdterm session, without any UI: the parameters of the next render,
the seed lock, the VRAM budget, the last prompt and image, and the slash commands typed into the
prompt box (each one an entry of ``sdterm/commands.py``).

The Textual app (``sdterm.ui``) drives this module; nothing here imports textual or rich, so a
test, a script or another front end can use it as it is. Values are checked by the one
parameter validator (:meth:`sdterm.params.Params.validated`), so a bad ``/steps 0`` gets exactly
the message that ``--steps 0`` gets. The prompt history (recall, search) is ``sdterm/history.py``;
rendering, saving and recording a render is ``sdterm/service.py``.

Draft mode (``/draft``): while it is on, every render asked for here is made with the draft
settings (``draft:`` in sdterm.yaml: sampler, steps, CFG, and an LCM-LoRA tag appended to the
prompt at render time), while :attr:`Session.params` keep the user's own full-quality settings
for :meth:`Session.full_quality` and for when draft mode is turned off.
"""

from __future__ import annotations

import os
import random

from .commands import COMMANDS, Command, CommandError, Outcome, sampler_label
from .commands_render import hires_summary
from .errors import ConfigError, shorten
from .history import History, HistoryEntry
from .params import MAX_SEED, Params
from .prompt_syntax import NetworkTagError, extra_networks, lora_tag
from .samplers import SAMPLERS
from .settings import DraftSettings
from .units import format_bytes

VARIATION_STEP = 0.05
"""The usual step of :meth:`Session.change_variation` (the app binds it to two keys)."""


class Session:
    """Parameters, seed lock, budget and commands of one interactive session.

    Methods that lead to a render return the validated :class:`Params` (with the prompt) for the
    front end to render; the parameters change only when they are valid.
    """

    def __init__(self, params: Params, history: History, rng: random.Random | None = None, *,
                 seed_locked: bool = False, budget: int | None = None, draft: DraftSettings | None = None):
        self.params = params.replace(prompt="")
        """The parameters of the next render; its prompt comes with the render (``prompt`` stays empty)."""
        self.seed_locked = seed_locked
        """True keeps the seed for new prompts; False draws a new random seed for each new prompt."""
        self.budget = budget
        """VRAM budget in bytes; None lets the engine decide from the free memory."""
        self.history = history
        """The prompt history, for recall and search (the render service appends to it)."""
        self.rng = rng if rng is not None else random.Random()
        self.last_prompt: str | None = None
        """The prompt of the last render asked for; what the seed and variation keys re-render."""
        self.last_path: str | None = None
        """The last image saved, for /open."""
        self.recalled = False
        """True after :meth:`restore` until the next render: re-rendering the recalled prompt keeps
        its seed even when the seed is unlocked (the parameter line says so)."""
        self.batch_count = 1
        """Images per render (``/n``), 1 ... MAX_BATCH: the front end renders
        ``sdterm.params.batch(params, batch_count)`` for each Params a method here returns."""
        self.draft_settings = draft if draft is not None else DraftSettings()
        """The draft renders' sampler, steps, CFG and LCM-LoRA (sdterm.yaml's ``draft:``)."""
        self.draft = False
        """Draft mode: True renders every request with :attr:`draft_settings` (``params`` stay the
        user's full settings)."""

    # ---- renders ---------------------------------------------------------------------------

    def _random_seed(self, avoid: int | None = None) -> int:
        while True:
            seed = self.rng.randint(0, MAX_SEED)
            if seed != avoid:
                return seed

    def _commit(self, trial: Params, prompt: str) -> Params:
        """Validate ``trial`` for ``prompt``; on success it becomes the parameters. The request
        is the draft one while draft mode is on."""
        request = self._drafted(trial.replace(prompt=prompt).validated())
        self.params = trial
        self.recalled = False
        return request

    def request(self, prompt: str) -> Params:
        """The parameters for ``prompt`` as they are (the draft settings while draft mode is on);
        ConfigError on bad values."""
        return self._drafted(self.params.replace(prompt=prompt).validated())

    # ---- draft mode ------------------------------------------------------------------------

    @property
    def draft_tag(self) -> str:
        """The draft LoRA's tag (``<lora:NAME:1>``) appended to draft prompts; "" for none."""
        return lora_tag(self.draft_settings.lora, 1) if self.draft_settings.lora else ""

    def draft_params(self, params: Params) -> Params:
        """``params`` as a draft renders them: the draft sampler (its own schedule), steps and CFG,
        and the draft LoRA's tag after the prompt unless the prompt names that LoRA already.
        Everything else (seed, size, negative prompt, variation) is kept. Not validated."""
        d = self.draft_settings
        prompt = params.prompt
        if self.draft_tag and d.lora not in _lora_names(prompt):
            prompt = f"{prompt} {self.draft_tag}" if prompt else self.draft_tag
        return params.replace(sampler=d.sampler, schedule="Automatic", steps=d.steps, cfg=d.cfg, prompt=prompt)

    @property
    def render_settings(self) -> Params:
        """The parameters the next render uses (the draft ones in draft mode), without its prompt."""
        return self.draft_params(self.params).replace(prompt="") if self.draft else self.params

    def _drafted(self, request: Params) -> Params:
        return self.draft_params(request).validated() if self.draft else request

    def set_draft(self, on: bool) -> bool:
        """Turn draft mode on or off (the full settings are untouched either way); the new state."""
        self.draft = bool(on)
        return self.draft

    def full_quality(self) -> Params | None:
        """The image last rendered (its prompt, seed, size) again with the full settings, draft
        mode left as it is; None when nothing was rendered yet. ConfigError on bad values."""
        if self.last_prompt is None:
            return None
        return self.params.replace(prompt=self.last_prompt).validated()

    def is_draft(self, params: Params) -> bool:
        """True when ``params`` look like a draft render: the draft sampler, steps and CFG (and,
        with a draft LoRA, its tag at the end of the prompt, as a draft appends it)."""
        d = self.draft_settings
        return ((params.sampler, params.steps, params.cfg) == (d.sampler, d.steps, d.cfg)
                and (not self.draft_tag or params.prompt.endswith(self.draft_tag)))

    def undraft(self, params: Params) -> Params:
        """A draft render's ``params`` as the full settings would render them: the prompt without
        the tag the draft appended, the sampler, schedule, steps and CFG of :attr:`params`.
        Other parameters come back as they are."""
        if not self.is_draft(params):
            return params
        prompt = params.prompt
        if self.draft_tag:
            prompt = prompt[: len(prompt) - len(self.draft_tag)].rstrip(" ")
        mine = self.params
        return params.replace(prompt=prompt, sampler=mine.sampler, schedule=mine.schedule, steps=mine.steps,
                              cfg=mine.cfg)

    def new_prompt(self, prompt: str) -> Params:
        """Render a newly entered prompt: a new random seed first unless the seed is locked."""
        trial = self.params if self.seed_locked else self.params.replace(seed=self._random_seed())
        request = self._commit(trial, prompt)
        self.last_prompt = prompt
        return request

    def rerun(self, prompt: str) -> Params:
        """Render ``prompt`` again with the parameters as they are, seed included (even when unlocked)."""
        request = self.request(prompt)
        self.last_prompt = prompt
        self.recalled = False
        return request

    def rerender(self) -> Params | None:
        """The last prompt again with the settings as they are now, seed included (Enter on the
        image); None when nothing was rendered yet. ConfigError on bad values."""
        return None if self.last_prompt is None else self.rerun(self.last_prompt)

    def nudge_seed(self, delta: int) -> Params | None:
        """Seed + ``delta`` (modulo 2^32) and re-render the last prompt; None (and nothing
        changed) when nothing was rendered yet."""
        if self.last_prompt is None:
            return None
        return self._commit(self.params.replace(seed=(self.params.seed + delta) % (MAX_SEED + 1)), self.last_prompt)

    def reroll(self) -> Params | None:
        """A new random seed and re-render the last prompt; None when nothing was rendered yet."""
        if self.last_prompt is None:
            return None
        return self._commit(self.params.replace(seed=self._random_seed(self.params.seed)), self.last_prompt)

    def toggle_lock(self) -> bool:
        self.seed_locked = not self.seed_locked
        return self.seed_locked

    def change_variation(self, delta: float) -> Params | None:
        """Variation strength + ``delta``, clamped to 0..1 and rounded to 2 decimals, and
        re-render the last prompt. Going up from 0 picks a new random variation seed.

        None (and nothing changed) when nothing was rendered yet, or when the strength is
        already at the limit in that direction (there would be nothing new to see).
        """
        if self.last_prompt is None:
            return None
        old = self.params.subseed_strength
        new = min(1.0, max(0.0, round(old + delta, 2)))
        if new == old:
            return None
        trial = self.params.replace(subseed_strength=new)
        if old == 0.0 and new > 0.0:
            trial = trial.replace(subseed=self._random_seed(avoid=self.params.seed))
        return self._commit(trial, self.last_prompt)

    # ---- commands --------------------------------------------------------------------------

    def set(self, **changes) -> Params:
        """Change parameters (a command's value): CommandError with the validator's one line, and
        nothing changed, when a value is bad."""
        trial = self.params.replace(**changes)
        try:
            trial.validated()
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        self.params = trial
        return trial

    def set_negative(self, text: str) -> None:
        """The negative prompt as typed in its box (any text is valid)."""
        self.params = self.params.replace(negative=text)

    def apply(self, command: Command) -> Outcome:
        """Carry out a slash command (its registry entry's handler). Setting a value does not
        render by itself; it returns Outcome("message", ...) saying the new value. CommandError
        leaves everything unchanged."""
        return COMMANDS[command.name].handler(self, command.arg)

    # ---- history ---------------------------------------------------------------------------

    def recall_entry(self, ref: str) -> tuple[int, HistoryEntry]:
        """(number, entry) of history entry ``ref``: its number ("12", as ``!12`` and ``/history``
        show it), else an image it made (a file name or path, ``00042-1234.png``). CommandError
        (one line) when there is none. Nothing changes: :meth:`restore` takes its parameters."""
        ref = ref.strip()
        numbered = self.history.numbered()
        if ref.isascii() and ref.isdigit():
            number = int(ref)
            if 1 <= number <= len(numbered):
                return numbered[number - 1]
            span = f"1 ... {len(numbered)}" if numbered else "the history is empty"
            raise CommandError(f"no history entry {shorten(ref, 20)} ({span})")
        entry = self.history.by_image(ref)
        for pair in reversed(numbered):
            if pair[1] is entry:
                return pair
        raise CommandError(f"no history entry for the image {shorten(ref)!r}")

    def restore(self, params: Params) -> None:
        """Take the parameters of an earlier render (the budget, the seed lock and draft mode stay
        as they are); its prompt becomes the last prompt, so the seed keys tweak it. A draft
        render (:meth:`is_draft`) comes back with the full settings instead of the draft ones
        (:meth:`undraft`): draft mode renders it as a draft again, the full-quality key in full.
        ConfigError, with nothing changed, if they cannot be rendered."""
        params = self.undraft(params)
        params.validated()
        self.params = params.replace(prompt="")
        self.last_prompt = params.prompt
        self.recalled = True

    def describe(self) -> str:
        """One line for the parameter bar, e.g.
        ``seed 1234 (locked) · ×4 · 50 steps · CFG 7.5 · 512×512 · eta 0 · var 0.10@567 · budget auto``
        (``×4``: a batch of 4 images per render, shown only above 1).
        An unlocked seed shows as ``seed random (last N)``: the next new prompt draws a new seed,
        while the seed keys start from N, the last render's seed; after a recall, ``seed N
        (recalled)``: the recalled prompt renders again with its own seed.
        The variation part appears only while the variation strength is above 0. A sampler other
        than DDIM shows before the steps (``DPM++ 2M Karras · 20 steps``), with its own eta (the
        ancestral and SDE samplers') or none; ``rng nv``/``rng gpu`` and ``ENSD N`` when set;
        ``img2img 0.60 from NAME`` (the strength and the init image's file name) while /init names one;
        ``hires 2x→1024x1536 Latent 0.70`` (scale or size → the final size, the upscaler, the hires
        steps when set, the hires strength) while the hires fix is on.
        In draft mode the line starts with what a render uses, ``DRAFT LCM 4 steps cfg 1.5``
        (``+ NAME``: the draft LoRA), and ends with the full settings kept aside: ``full: DDIM 50
        steps CFG 7.5``."""
        full = self.params
        p = self.draft_params(full) if self.draft else full
        if self.seed_locked:
            seed = f"seed {p.seed} (locked)"
        elif self.recalled:
            seed = f"seed {p.seed} (recalled)"
        else:  # a new prompt draws a new seed: showing p.seed would name a seed that won't be used
            seed = "seed random" + (f" (last {p.seed})" if self.last_prompt is not None else "")
        parts = [seed, f"{p.width}×{p.height}"]
        if self.draft:
            lora = f" + {self.draft_settings.lora}" if self.draft_settings.lora else ""
            parts.insert(0, f"DRAFT {sampler_label(p)} {_steps(p.steps)} cfg {p.cfg:g}{lora}")
        else:
            parts[1:1] = [_steps(p.steps), f"CFG {p.cfg:g}"]
            if p.sampler != "DDIM":
                parts.insert(1, sampler_label(p))
        info = SAMPLERS[p.sampler]
        if p.sampler == "DDIM" or (info.uses_eta and info.k_diffusion):
            parts.append(f"eta {p.eta if p.sampler == 'DDIM' else p.eta_ancestral:g}")
        if p.rng != "cpu":
            parts.append(f"rng {p.rng}")
        if p.ensd:
            parts.append(f"ENSD {p.ensd}")
        if p.clip_skip != 1:
            parts.append(f"clip skip {p.clip_skip}")
        if p.init_image:
            parts.append(f"img2img {p.strength:.2f} from {os.path.basename(p.init_image) or p.init_image}")
        if p.hires:
            parts.append(f"hires {hires_summary(p)}")
        if self.batch_count > 1:
            parts.insert(2 if self.draft else 1, f"×{self.batch_count}")
        if p.subseed_strength > 0:
            parts.append(f"var {p.subseed_strength:.2f}@{p.subseed}")
        parts.append("budget " + ("auto" if self.budget is None else format_bytes(self.budget, "size")))
        if self.draft:
            parts.append(f"full: {sampler_label(full)} {_steps(full.steps)} CFG {full.cfg:g}")
        return " · ".join(parts)


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def _lora_names(prompt: str) -> set[str]:
    """The names of the LoRA tags in ``prompt`` (none when a tag can't be read)."""
    try:
        return {tag.name for tag in extra_networks(prompt)[1] if tag.kind == "lora"}
    except NetworkTagError:
        return set()


def describe_networks(prompt: str) -> tuple[str, bool]:
    """The parameter line's part for the LoRA tags of ``prompt``: (``"LoRA detail×0.8, lcm×1"``,
    False); ``"LoRA x te×1 unet×0.5"`` when the two weights differ; other kinds of tag (A1111's
    hypernetworks) are named as not used. ("", False) for none; (the tag's one-line error, True)
    for a tag whose weight is not a number."""
    try:
        tags = extra_networks(prompt)[1]
    except NetworkTagError as exc:
        return str(exc), True
    loras, others = [], []
    for tag in tags:
        if tag.kind != "lora":
            others.append(f"<{tag.kind}:{tag.name}> not used")
        elif tag.te == tag.unet:
            loras.append(f"{tag.name}×{tag.te:g}")
        else:
            loras.append(f"{tag.name} te×{tag.te:g} unet×{tag.unet:g}")
    text = ("LoRA " + ", ".join(loras) if loras else "")
    return " · ".join(t for t in (text, *others) if t), False
