"""Text for the screen that is never parsed as markup.

Textual reads a ``str`` given to ``Static(...)``, ``.update(...)``, ``border_title``, a command
palette hit or ``notify`` as *markup*: ``[/snow]`` in a prompt raises ``MarkupError`` and
``a fox in [snow]`` loses ``[snow]``. Prompts (A1111 emphasis: ``(red:1.3) [blurry]``), model
folder names (``demo [fp16]``), paths and error messages are user text, so everything the app
shows goes through :func:`plain` (or :func:`highlight` for fuzzy matches) — never a bare ``str``.
"""

from __future__ import annotations

from textual.content import Content
from textual.fuzzy import Matcher


def plain(text: str, style: str = "") -> Content:
    """``text`` exactly as written, optionally in one ``style`` (a Textual style string)."""
    return Content.styled(text, style) if style else Content(text)


def highlight(matcher: Matcher, text: str) -> Content:
    """``text`` as plain content with the characters ``matcher`` matched highlighted (spans on the
    plain text: Textual's ``Matcher.highlight`` parses the candidate as markup)."""
    content = Content(text)
    score, offsets = matcher.fuzzy_search.match(matcher.query, text)
    if not score:
        return content
    for offset in offsets:
        if not text[offset].isspace():
            content = content.stylize(matcher.match_style, offset, offset + 1)
    return content
