"""The token line under the prompt box: how the prompt being typed is tokenized, live (InvokeAI's
"log tokenization", as you type).

::

    58 tokens · 1 chunk (17 left) │ a lighthouse at dusk , oil×1.30 painting , ‹foxy:3v› blurry×0.91 …
    160 tokens · 3 chunks (65 left) │ a red fox … in the snow , ┃72┃ word , … word , ┃75┃ cat ┃10┃

The count is AUTOMATIC1111's (75 for each closed chunk plus the last chunk's tokens), and ``N left``
is what still fits in the last chunk. Each chunk ends in ``┃N┃``, its own token count, so the place
where chunk 1 ends (where a ``BREAK`` would go) is in sight; a long chunk keeps its first words
and, longer, its last ones. Weighted text is warm (above 1) or cool (below 1) with its ``×1.30``;
an embedding is ``‹name:Nv›`` (its vectors). The line describes the negative prompt while that box
has the focus. It is blank for an empty prompt and while a slash command is typed.

The engine's ``explain`` (which loads the tokenizer on its first call, and reads files) runs
in a thread worker after a short pause in typing; a newer text supersedes the one on its way. What
it raises (a prompt over 8 chunks, a broken tokenizer) is the line's one line. The prompt is user
text: every part of the line is built with ``Text.append``, never parsed as markup.
"""

from __future__ import annotations

import io
from functools import partial
from typing import Any, Callable

from rich.console import Console
from rich.text import Text
from textual.message import Message
from textual.widgets import Static
from textual.worker import get_current_worker

from ...errors import classify

CHUNK = 75
DEBOUNCE = 0.2
"""Seconds without a keystroke before the text is tokenized."""

DIM = "dim"
COUNT = "bold"
WARM = "bold #ffaf5f"
COOL = "#5fafd7"
EMBEDDING = "bold #d787ff"
MARK = "bold #ffd75f"
NOTE = "italic #d7af5f"
ERROR = "#ffaf5f"

_console: Console | None = None


def _wrap_console() -> Console:
    """A console for ``Text.wrap`` (it measures; nothing is written)."""
    global _console
    if _console is None:
        _console = Console(file=io.StringIO(), width=200, color_system=None)
    return _console


def _weight(w: float) -> str:
    """``×1.30``; "" for 1."""
    return "" if round(w, 2) == 1 else f"×{w:.2f}"


def piece_text(piece) -> Text:
    """One piece: an embedding ``‹name:Nv›``, a weighted run (warm above 1, cool below) with its
    weight, or plain tokens; a space after it where its last token ends a word."""
    suffix = _weight(piece.weight)
    style = "" if not suffix else (WARM if piece.weight > 1 else COOL)
    out = Text()
    if piece.embedding is not None:
        out.append(f"‹{piece.embedding}:{piece.tokens}v›", EMBEDDING)
        out.append(suffix, style)
        out.append(" ")
        return out
    words = " ".join(piece.text.split())  # decoded tokens: no newline, one space between words
    out.append(words, style)
    out.append(suffix, style)
    if piece.text.endswith(" ") or suffix:
        out.append(" ")
    return out


def chunk_text(pieces) -> Text:
    return Text("").join(piece_text(p) for p in pieces)


def elide(text: Text, budget: int) -> Text:
    """``text`` in at most ``budget`` cells: its start, ``…``, and (longer) its end, the words
    just before the chunk's boundary."""
    if len(text) <= budget:
        return text
    if budget <= 1:
        return Text("…", DIM)
    head = budget // 3
    tail = budget - head - 1
    return Text.assemble(text[:head], ("…", DIM), text[len(text) - tail:])


def header(report, negative: bool) -> Text:
    n = len(report.chunks)
    left = CHUNK - sum(p.tokens for p in report.chunks[-1]) if report.chunks else CHUNK
    out = Text()
    if negative:
        out.append("negative: ", DIM)
    out.append(str(report.tokens), COUNT)
    out.append(" token" + ("" if report.tokens == 1 else "s"), DIM)
    out.append(f" · {n} chunk" + ("" if n == 1 else "s") + f" ({left} left)", DIM)
    return out


def notes(report) -> Text:
    out = Text()
    if report.variants > 1:
        out.append(f" · {report.variants} schedule variants: showing the longest", NOTE)
    if report.has_and:
        out.append(" · AND is read as a word", NOTE)
    return out


def token_text(report, width: int, *, negative: bool = False, max_lines: int | None = None) -> Text:
    """The line (``\\n`` between its lines) for ``report`` in ``width`` cells: one line for a
    short prompt, at most 2 for one chunk and 3 for more; each chunk shortened alike to fit."""
    width = max(width, 10)
    chunks = [chunk_text(c) for c in report.chunks]
    several = len(chunks) > 1
    allowed = max_lines or (2 if len(chunks) == 1 and not (report.variants > 1 or report.has_and) else 3)
    head, tail = header(report, negative), notes(report)
    budget = max((len(c) for c in chunks), default=0)
    while True:
        body = Text()
        for chunk, pieces in zip(chunks, report.chunks):
            body.append_text(elide(chunk, budget))
            if several:
                body.append(f"┃{sum(p.tokens for p in pieces)}┃", MARK)
                body.append(" ")
        body.rstrip()
        text = Text.assemble(head, (" │ ", DIM), body, tail) if len(body) else Text.assemble(head, tail)
        lines = text.wrap(_wrap_console(), width)
        if len(lines) <= allowed or budget <= 4:
            break
        budget = max(4, min(budget - 1, budget * 4 // 5))
    if len(lines) > allowed:
        lines = lines[:allowed]
        last = lines[-1]
        last.truncate(width - 1)
        last.append("…", DIM)
    return Text("\n").join(lines)


def error_text(message: str, width: int, *, negative: bool = False) -> Text:
    out = Text()
    if negative:
        out.append("negative: ", DIM)
    out.append("tokens: ", DIM)
    out.append(" ".join(message.split()), ERROR)
    out.truncate(max(width, 10), overflow="ellipsis")
    return out


class TokenLine(Static):
    """The token line; the app calls :meth:`describe` whenever the text, the focus, the steps,
    the sampler or the model change (an unchanged request costs nothing)."""

    class Explained(Message, bubble=False):
        """A worker's report (or the exception it raised) for ``key``."""

        def __init__(self, key: tuple, result: Any) -> None:
            super().__init__()
            self.key = key
            self.result = result

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self._wanted: tuple | None = None
        """What the line shows, or will once its worker reports (None: nothing to tokenize)."""
        self._timer = None
        self._shown: tuple[Any, bool] | None = None
        """The report (or error line) on screen and whether it is the negative's: laid out again on a resize."""

    def describe(self, engine, text: str, *, steps: int, sampler: str, negative: bool = False,
                 loading: bool = False) -> None:
        """Show how ``text`` (the prompt, or the negative prompt) is tokenized for ``steps`` and
        ``sampler`` by ``engine`` (None while a model loads: ``loading`` says so)."""
        explain: Callable | None = getattr(engine, "explain", None)
        blank = not text.strip() or (not negative and text.startswith("/"))  # nothing, or a command line
        if blank or explain is None:
            self._cancel()
            self._show(Text("tokens: model loading", DIM) if loading and not blank else Text())
            return
        key = (id(engine), negative, text, steps, sampler)
        if key == self._wanted:
            return  # on screen already, or on its way
        self._cancel()
        self._wanted = key
        self._timer = self.set_timer(DEBOUNCE, partial(self._start, explain, key))

    def _cancel(self) -> None:
        self._wanted = None
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _start(self, explain: Callable, key: tuple) -> None:
        self._timer = None
        if key == self._wanted:
            self.run_worker(partial(self._explain, explain, key), thread=True, exclusive=True,
                            group="token-line", exit_on_error=False)

    def _explain(self, explain: Callable, key: tuple) -> None:
        """On a worker thread: the engine's report, posted back (or what it raised)."""
        _, negative, text, steps, sampler = key
        try:
            result = explain(text, steps=steps, sampler=sampler)
        except Exception as exc:  # one line on the token line, never a crash
            result = exc
        if not get_current_worker().is_cancelled:
            self.post_message(self.Explained(key, result))

    def on_token_line_explained(self, message: Explained) -> None:
        if message.key != self._wanted:
            return  # the text changed since: a newer report is on its way
        self._show_result(message.result, message.key[1])

    def _show_result(self, result, negative: bool) -> None:
        self._shown = (result, negative)
        width = self._width()
        if isinstance(result, BaseException):
            self.update(error_text(classify(result).line, width, negative=negative))
        else:
            self.update(token_text(result, width, negative=negative))

    def _show(self, text: Text) -> None:
        self._shown = None
        self.update(text)

    def _width(self) -> int:
        # One cell spare: Textual crops a line that fills the whole width by its last cell.
        width = self.content_size.width
        return (width if width > 0 else max(self.app.size.width - 2, 10)) - 1

    def on_resize(self) -> None:
        if self._shown is not None:
            self._show_result(*self._shown)
