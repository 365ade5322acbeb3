"""The token line under the prompt box (issue 14): the token count, where each 75-token chunk ends,
weights and embeddings, live as you type; driven through Pilot on the demo model (the helpers and
the watched engine are tests/test_app.py's), plus the layout of a report on its own."""

from __future__ import annotations

import threading

import pytest
import torch
from rich.text import Text
from textual import events
from textual.widgets import Input

from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.prompt.report import Piece, PromptReport
from sdterm.history import History, history_file
from sdterm.params import Params
from sdterm.session import Session
from sdterm.ui.app import SdtermApp
from sdterm.ui.widgets.token_line import TokenLine, token_text
from tests.test_app import (  # noqa: F401 (fixtures)
    SIZE, SMALL, TIMEOUT, drawn, engine, make_app, real_engine, settle, wait_until,
)
from tests.test_prompt_burst import burst, keys

pytestmark = [pytest.mark.usefixtures("one_thread")]

LONG = ", ".join(f"word{i}" for i in range(20))
"""More than 75 tokens on the demo tokenizer: two chunks."""


def line(app) -> str:
    """The token line as drawn (its lines joined by newlines; "" when blank)."""
    return "\n".join(drawn(app.query_one("#tokens"))).strip()


async def type_in(pilot, text: str, *, box: str = "#prompt") -> None:
    """Clear ``box`` and paste ``text`` into it (one paste event, as a terminal sends it)."""
    field = pilot.app.query_one(box, Input)
    field.focus()
    await pilot.press("end", "ctrl+u")
    pilot.app.post_message(events.Paste(text))
    await pilot.pause()
    assert field.value == text


def flat(app) -> str:
    """The token line's lines joined by spaces (a phrase may wrap)."""
    return " ".join(part.strip() for part in line(app).splitlines())


async def line_shows(pilot, *parts: str, what: str = "the token line") -> str:
    """Wait until each of ``parts`` is on the line; the line, its lines joined by spaces."""
    try:
        await wait_until(pilot, lambda: all(p in flat(pilot.app) for p in parts), what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {parts} not all in {line(pilot.app)!r}") from None
    return flat(pilot.app)


def counted(engine) -> list:
    """Wrap the watched engine's ``explain``: the list of (text, steps, sampler) it was asked for."""
    calls = []
    explain = engine._engine.explain

    def watched(text, steps=20, sampler="DDIM"):
        calls.append((text, steps, sampler))
        return explain(text, steps=steps, sampler=sampler)

    engine.explain = watched
    return calls


# ---- the count and the chunks ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_count_and_where_each_chunk_ends(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "a red fox")
        short = engine.explain("a red fox", steps=3)
        left = 75 - short.tokens
        shown = await line_shows(pilot, f"{short.tokens} tokens · 1 chunk ({left} left)")
        assert "a red fox" in shown and "┃" not in shown  # one chunk: no boundary drawn
        await type_in(pilot, LONG)
        report = engine.explain(LONG, steps=3)
        first, second = (sum(p.tokens for p in c) for c in report.chunks)
        assert len(report.chunks) == 2 and first <= 75
        shown = await line_shows(pilot, f"{report.tokens} tokens · 2 chunks ({75 - second} left)")
        # Chunk 1 ends in its count, right after its last words (where a BREAK would go).
        last_words = report.chunks[0][-1].text.split()[-2:]
        assert f"{' '.join(last_words)} ┃{first}┃" in shown, shown
        assert shown.rstrip().endswith(f"┃{second}┃"), shown
        assert len(line(app).splitlines()) <= 3


@pytest.mark.asyncio
async def test_weights_embeddings_and_notes_are_marked(demo_model, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    base = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder])
    torch.save({"string_to_param": {"*": torch.randn(3, base.models.cfg.text.hidden_size)}}, folder / "foxy.pt")
    app = make_app(base, tmp_path, steps=20)
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "a (red:1.3) fox, [blurry], foxy")
        shown = await line_shows(pilot, "‹foxy:3v›")
        assert "red×1.30" in shown and "blurry×0.91" in shown
        strip = app.query_one("#tokens").render_lines(app.query_one("#tokens").region.reset_offset)[0]
        styles = {seg.text.strip(): seg.style for seg in strip if seg.text.strip()}
        warm, cool, plain = (styles[t].color.get_truecolor() for t in ("red", "blurry", "a"))
        assert styles["red"].bold and warm.red > warm.blue + 100, "weight above 1: bold and warm"
        assert cool.blue > cool.red + 100, "weight below 1: cool"
        assert styles["‹foxy:3v›"].color.get_truecolor() not in (plain, warm, cool), "an embedding stands out"
        # Scheduling follows the session's steps: [a:b:5] is two texts at 20 steps, one at 3.
        await type_in(pilot, "a [cat:dog:5] AND a fox")
        await line_shows(pilot, "2 schedule variants: showing the longest", "AND is read as a word")
        await type_in(pilot, "/steps 3")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.session.params.steps == 3, "/steps 3")
        await type_in(pilot, "a [cat:dog:5] AND a fox")
        shown = await line_shows(pilot, "AND is read as a word")
        await pilot.pause(0.4)
        assert "schedule variants" not in line(app)


# ---- user text is data -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_markup_looking_prompts_are_shown_literally(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        prompt = r"\[/bold\] [red] \(x:1.2\)"
        await type_in(pilot, prompt)
        report = engine.explain(prompt, steps=3)
        expected = " ".join(report.chunks[0][0].text.split())  # "[/ bold ]" as the demo tokenizer decodes it
        assert "[/" in expected
        await line_shows(pilot, expected, "red×0.91")
        # Text that is markup to Rich and Textual, from the tokenizer or an embedding's name.
        engine.explain = lambda text, steps=20, sampler="DDIM": PromptReport(
            5, ((Piece("[red]big[/red] ", 1.2, 3), Piece("[bold]", 1.0, 2, "[bold]")),), ("[bold]",), 1, False)
        await type_in(pilot, "anything")
        await line_shows(pilot, "[red]big[/red]×1.20 ‹[bold]:2v›")
        assert app.is_running


def test_the_layout_never_reads_text_as_markup():
    report = PromptReport(
        6, ((Piece("[bold]big[/bold] ", 1.0, 3), Piece("[red]", 1.1, 1, "[red]"), Piece("\\[ (x:1.2) ", 0.5, 2)),),
        ("[red]",), 1, False)
    text = token_text(report, 100)
    assert isinstance(text, Text)
    assert "[bold]big[/bold] ‹[red]:1v›×1.10 \\[ (x:1.2)×0.50" in text.plain, text.plain
    assert text.plain.startswith("6 tokens · 1 chunk (69 left) │ ")


def test_a_long_report_keeps_each_chunks_end_in_three_lines():
    words = [Piece(f"w{i} ", 1.0, 5) for i in range(15)]
    chunks = tuple(tuple(words) for _ in range(5))
    text = token_text(PromptReport(375, chunks, (), 1, False), 60)
    lines = text.plain.splitlines()
    assert len(lines) <= 3 and all(len(x) <= 60 for x in lines), lines
    assert text.plain.count("┃75┃") == 5 and "w14 ┃75┃" in text.plain.replace("\n", " "), text.plain


# ---- when the line is blank --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_slash_command_or_an_empty_box_blanks_the_line(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "a red fox")
        await line_shows(pilot, "tokens")
        await pilot.press("ctrl+u", *"/ste")
        await wait_until(pilot, lambda: line(app) == "", "a blank line while a command is typed")
        await pilot.pause(0.4)  # and no late report brings it back
        assert line(app) == ""
        await pilot.press("ctrl+u", *"fox")
        await line_shows(pilot, "tokens")
        await pilot.press("ctrl+u")
        await wait_until(pilot, lambda: line(app) == "", "a blank line for an empty box")


@pytest.mark.asyncio
async def test_while_the_model_loads_the_line_says_so(engine, tmp_path):
    gate = threading.Event()
    history = History(history_file())

    def load(name, progress):
        from sdterm.service import RenderService

        assert gate.wait(TIMEOUT)
        return RenderService(engine, tmp_path / "out", history)

    app = SdtermApp(None, Session(Params(**SMALL), history), load=load, image_protocol="halfcell")
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "a red fox")
        await pilot.pause(0.3)
        assert line(app) == "tokens: model loading"
        gate.set()
        await line_shows(pilot, "tokens · 1 chunk")


# ---- the worker: debounced, the newest text wins -----------------------------------------------


@pytest.mark.asyncio
async def test_a_burst_of_keys_is_tokenized_once_for_the_final_text(engine, tmp_path):
    calls = counted(engine)
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        burst(app, *keys("a red fox in the snow"))
        await wait_until(pilot, lambda: app.query_one("#prompt", Input).value == "a red fox in the snow", "the keys")
        final = engine._engine.explain("a red fox in the snow", steps=3)
        await line_shows(pilot, f"{final.tokens} tokens", "in the snow")
        assert [c[0] for c in calls] == ["a red fox in the snow"], calls
        assert calls[-1][1:] == (3, "DDIM")


@pytest.mark.asyncio
async def test_a_late_report_for_an_older_text_is_dropped(engine, tmp_path):
    calls = counted(engine)
    started, release = threading.Event(), threading.Event()
    explain = engine.explain

    def slow_for_cat(text, steps=20, sampler="DDIM"):
        if text == "cat":
            started.set()
            assert release.wait(TIMEOUT)
        return explain(text, steps=steps, sampler=sampler)

    engine.explain = slow_for_cat
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "cat")
        await wait_until(pilot, started.is_set, "the slow report started")
        await type_in(pilot, LONG)
        await line_shows(pilot, "2 chunks")
        release.set()
        await wait_until(pilot, lambda: ("cat", 3, "DDIM") in calls, "the slow report")
        await pilot.pause(0.3)
        assert "2 chunks" in line(app), line(app)


# ---- errors and the negative prompt ------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_error_is_one_line_and_the_app_stays(engine, tmp_path):
    from sdterm.engine.loading.checkpoint import CheckpointError

    app = make_app(engine, tmp_path)
    async with app.run_test(size=(70, 30)) as pilot:
        await type_in(pilot, " ".join(["word"] * 700))
        await line_shows(pilot, "tokens: prompt is")
        assert len(line(app).splitlines()) == 1 and line(app).endswith("…") and app.is_running

        def broken(text, steps=20, sampler="DDIM"):
            raise CheckpointError("tokenizer/vocab.json: not a usable CLIP tokenizer [bold]x")

        engine.explain = broken
        await type_in(pilot, "a fox")
        shown = await line_shows(pilot, "tokens: tokenizer/vocab.json: not a usable CLIP tokenizer [bold]x")
        assert app.is_running and app.internal_errors == []


@pytest.mark.asyncio
async def test_the_negative_box_has_its_own_line_while_it_has_the_focus(engine, tmp_path):
    app = make_app(engine, tmp_path, negative="blurry, (ugly:1.2)")
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "a red fox")
        await line_shows(pilot, "a red fox")
        app.query_one("#negative", Input).focus()
        shown = await line_shows(pilot, "negative: ", "ugly×1.20")
        assert "red fox" not in shown
        await pilot.press("end", *" /x")  # a slash in the negative is text, never a command
        report = engine.explain("blurry, (ugly:1.2) /x", steps=3)
        await line_shows(pilot, f"negative: {report.tokens} tokens")
        app.query_one("#prompt", Input).focus()
        shown = await line_shows(pilot, "a red fox")
        assert "negative" not in shown
