"""The help screen and the history search (a command-palette provider)."""

from __future__ import annotations

from functools import partial

from textual.app import ComposeResult
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, OptionList
from textual.widgets.option_list import Option

from ..commands import COMMANDS, sampler_label
from ..commands_render import hires_summary
from ..params import Params
from ..samplers import SAMPLER_LIST
from .text import highlight, plain

HELP = """\
# sdterm keys

| where | key | does |
|---|---|---|
| prompt | **Enter** | render (or run a `/command`) |
| prompt | **/** right after a render | a command line: the prompt waits aside and comes back (Esc: back now) |
| prompt | **↑ / ↓** | earlier / later prompts (your settings stay) |
| prompt | **!N** Enter | history entry N with its settings (`/history` lists them) |
| prompt | paste | an A1111 parameters block sets the prompt and every setting in it |
| prompt | the line under it | tokens as you type: the count, where each 75-token chunk ends (`┃72┃`: put BREAK there), weights `×1.30`, embeddings `‹name:Nv›` (the negative's while its box has the focus) |
| anywhere | **Ctrl+R** | search the history (restores that render's settings) |
| anywhere | **Tab / Shift+Tab** | prompt → image → negative prompt |
| image | **Enter** | render again with the current settings |
| image | **] / [** | seed +1 / −1 and render (an image made before is shown again) |
| image | **r** | a new random seed and render |
| image | **l** | lock / unlock the seed (locked: new prompts keep it) |
| image | **v / V** | variation strength +0.05 / −0.05 and render |
| image | **z** | zoom: the image fills the screen (z or Tab back) |
| image | **s** | pick the sampler (`/schedule` sets the schedule) |
| anywhere | **F2** (**d** on the image) | draft mode on / off (`/draft`): renders use the draft settings (`draft:` in sdterm.yaml: LCM, 4 steps, CFG 1.5, its LCM-LoRA); yours are kept for when it is off |
| image | **i** | img2img: the image shown becomes the init image (`/init`) and renders again at `/strength`; press again to keep refining, `/init off` for noise; with `/hires` on, the hires fix goes off and the size becomes the image's |
| anywhere | **F3** (**f** on the image) | the image shown again (same prompt, seed, size) with your full settings; draft mode stays on |
| history | a draft render | Ctrl+R, `!N`, `/load` bring back its prompt (without the draft's LoRA tag), seed and size with your full settings: Enter renders it as a draft again in draft mode, F3 in full |
| contact sheet | **← → ↑ ↓**, **Enter** | pick an image of a batch (`/n N`), then work on it |
| anywhere | **Esc** | cancel the render at the next step (and the queued ones) |
| anywhere | **F1** | this help; **?** too, outside the prompt or in an empty one |
| anywhere | **Ctrl+Q** | quit (cancels a render cleanly) |

# Commands (type in the prompt; → completes a name)

{commands}

Press Esc, ? or F1 to close.
"""


def help_text() -> str:
    """The help screen's Markdown: the keys, then every command of the registry with what it does."""
    lines = []
    for command in COMMANDS.values():
        also = f" (also {', '.join('/' + a for a in command.aliases)})" if command.aliases else ""
        lines.append(f"- `{command.usage}`: {command.help}{also}")
    return HELP.format(commands="\n".join(lines))


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape", "dismiss", "close"), ("question_mark", "dismiss", "close"), ("f1", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: 90%; border: round $accent; background: $panel; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(help_text())


def summary(p: Params) -> str:
    """``seed 1234 · 30 steps · CFG 7 · 512×768``: a render's settings in a line (a sampler other
    than DDIM before the steps: ``seed 1234 · DPM++ 2M Karras · 20 steps · …``; the hires fix after
    the size: ``· hires 2x→1024x1536 Latent 0.70``)."""
    sampler = "" if p.sampler == "DDIM" else f"{sampler_label(p)} · "
    hires = f" · hires {hires_summary(p)}" if p.hires else ""
    return f"seed {p.seed} · {sampler}{p.steps} steps · CFG {p.cfg:g} · {p.width}×{p.height}{hires}"


class HistoryProvider(Provider):
    """Fuzzy search over earlier renders; choosing one restores its prompt and settings."""

    async def search(self, query: str) -> Hits:
        app = self.app
        matcher = self.matcher(query)
        for rank, entry in enumerate(app.session.history.search(query, limit=30)):
            p = entry.params
            label = p.prompt or "(empty prompt)"
            detail = summary(p)
            # The session ranks; the palette sorts by score, so keep that order.
            yield Hit(1.0 - rank / 100, highlight(matcher, label), partial(app.restore_params, p), text=label,
                      help=plain(detail))

    async def discover(self) -> Hits:
        app = self.app
        for entry in app.session.history.prompts()[:30]:
            p = entry.params
            label = p.prompt or "(empty prompt)"
            detail = f"seed {p.seed} · {p.steps} steps · {entry.time}"
            yield DiscoveryHit(plain(label), partial(app.restore_params, p), text=label, help=plain(detail))


class HistoryScreen(ModalScreen[None]):
    """``/history``: the last renders, numbered as ``!N`` recalls them; Enter restores one (its
    prompt and settings), Esc closes."""

    BINDINGS = [("escape", "dismiss", "close")]
    DEFAULT_CSS = """
    HistoryScreen { align: center middle; }
    HistoryScreen > OptionList { width: 90%; max-width: 140; height: 80%; border: round $accent; }
    """

    def __init__(self, history, last: int, restore) -> None:
        super().__init__()
        self.entries = history.numbered(last)
        self.restore = restore

    def compose(self) -> ComposeResult:
        options = [Option(plain(f"!{n:<4} {entry.params.prompt or '(empty prompt)'}  ·  {summary(entry.params)}"))
                   for n, entry in reversed(self.entries)]
        box = OptionList(*options) if options else OptionList(Option(plain("no history yet"), disabled=True))
        box.border_title = plain("history: Enter restores · Esc closes")
        yield box

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        n, entry = list(reversed(self.entries))[event.option_index]
        self.dismiss()
        self.restore(entry.params, what=f"history !{n}")


class SamplerScreen(ModalScreen[None]):
    """``s`` on the image: the samplers, the current one highlighted, with their model calls per step
    and their default schedule; Enter sets one (as ``/sampler NAME``), Esc closes."""

    BINDINGS = [("escape", "dismiss", "close")]
    DEFAULT_CSS = """
    SamplerScreen { align: center middle; }
    SamplerScreen > OptionList { width: 72; max-width: 95%; height: auto; max-height: 90%; border: round $accent; }
    """

    def __init__(self, current: str, choose) -> None:
        super().__init__()
        self.current = current
        self.choose = choose
        """Called with the sampler's name (the app runs ``/sampler NAME``)."""

    def compose(self) -> ComposeResult:
        def row(s) -> str:
            calls = "2 calls/step" if s.second_order else "1 call/step"
            noise = "deterministic" if s.deterministic else "stochastic"
            schedule = f"{s.default_schedule} schedule" if s.k_diffusion else "own timesteps"
            return f"{s.name:<13} {calls:<13} {noise:<14} {schedule}"

        box = OptionList(*[Option(plain(row(s)), id=s.name) for s in SAMPLER_LIST])
        box.border_title = plain("sampler: Enter sets it · Esc closes")
        names = [s.name for s in SAMPLER_LIST]
        box.highlighted = names.index(self.current) if self.current in names else 0
        yield box

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        name = SAMPLER_LIST[event.option_index].name
        self.dismiss()
        self.choose(name)
