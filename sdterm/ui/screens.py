"""The help screen and the history search (a command-palette provider)."""

from __future__ import annotations

from functools import partial

from textual.app import ComposeResult
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from ..commands import COMMANDS
from ..params import Params
from .text import highlight, plain

HELP = """\
# sdterm keys

| where | key | does |
|---|---|---|
| prompt | **Enter** | render (or run a `/command`) |
| prompt | **↑ / ↓** | earlier / later prompts, with their settings |
| anywhere | **Ctrl+R** | search the history |
| anywhere | **Tab / Shift+Tab** | prompt ↔ image and panel ↔ negative prompt |
| image/panel | **] / [** | seed +1 / −1 and render |
| image/panel | **r** | a new random seed and render |
| image/panel | **l** | lock / unlock the seed (locked: new prompts keep it) |
| image/panel | **v / V** | variation strength +0.05 / −0.05 and render |
| anywhere | **Esc** | cancel the render at the next step |
| outside the prompt | **?** | this help (or `/help`) |
| anywhere | **Ctrl+Q** | quit (cancels a render cleanly) |

# Commands (type in the prompt; → completes a name)

{commands}

Press Esc or ? to close.
"""


def help_text() -> str:
    """The help screen's Markdown: the keys, then every command of the registry with what it does."""
    lines = []
    for command in COMMANDS.values():
        also = f" (also {', '.join('/' + a for a in command.aliases)})" if command.aliases else ""
        lines.append(f"- `{command.usage}`: {command.help}{also}")
    return HELP.format(commands="\n".join(lines))


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape", "dismiss", "close"), ("question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; max-width: 100; height: 90%; border: round $accent; background: $panel; }
    """

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(help_text())


def summary(p: Params) -> str:
    """``seed 1234 · 30 steps · CFG 7 · 512×768``: a render's settings in a line."""
    return f"seed {p.seed} · {p.steps} steps · CFG {p.cfg:g} · {p.width}×{p.height}"


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
