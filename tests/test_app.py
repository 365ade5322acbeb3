"""The app, driven through Textual's Pilot (``App.run_test``): the real SdtermApp on the real engine
with the tiny demo model, at 64x64 and 3 steps.

The engine is wrapped by :class:`Held`, which only watches: it records each request and how it
ended, and can hold one render after its first U-Net step until the test lets it go. That makes
"Esc during a render", "Ctrl+Q during a render" and "keys pressed during a render" deterministic
without making any render slow.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from textual import events
from textual.command import CommandList, CommandPalette
from textual.geometry import Region
from textual.widgets import Input, Static

from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.events import StepDone
from sdterm.engine.pipeline import Cancelled, Engine, open_model
from sdterm.errors import ConfigError
from sdterm.history import History, history_file
from sdterm.params import Params
from sdterm.service import RenderService
from sdterm.session import Session
from sdterm.ui.app import SdtermApp
from sdterm.ui.screens import HelpScreen
from sdterm.ui.widgets.image_view import ImageView

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]

SMALL = dict(steps=3, width=64, height=64)
TIMEOUT = 20.0
SIZE = (100, 30)


# --------------------------------------------------------------------------------------------
# The engine, watched
# --------------------------------------------------------------------------------------------


class Held:
    """The real engine with a window on it: ``requests`` (each render asked for, in order),
    ``outcomes`` ('done' / 'cancelled' / an exception's name) and ``hold()``: the next render
    stops after its first U-Net step until ``release()``."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.requests = []
        self.options: list[dict] = []
        self.outcomes: list[str] = []
        self.steps_done: list[int] = []
        self._hold_next = False
        self.reached = threading.Event()
        self._release = threading.Event()
        self.idle = threading.Event()
        self.idle.set()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def hold(self) -> None:
        self._hold_next = True
        self.reached.clear()
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def generate(self, request, *, emit, cancelled, **options):
        self.idle.clear()
        self.requests.append(request)
        self.options.append(options)  # preview, trail, fork: passed on
        hold, self._hold_next = self._hold_next, False
        steps = [0]

        def watched(event) -> None:
            emit(event)
            if isinstance(event, StepDone):
                steps[0] = event.step
                if hold and event.step == 1:
                    self.reached.set()
                    if not self._release.wait(TIMEOUT):
                        raise RuntimeError("the test never released the held render")

        try:
            result = self._engine.generate(request, emit=watched, cancelled=cancelled, **options)
        except Cancelled:
            self.outcomes.append("cancelled")
            raise
        except Exception as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        finally:
            self.steps_done.append(steps[0])
            self.idle.set()
        self.outcomes.append("done")
        return result


@pytest.fixture(scope="module")
def real_engine(demo_model):
    return Engine(open_model(demo_model), "cpu")


@pytest.fixture
def engine(real_engine, tmp_path):
    real_engine.cache = EmbeddingCache(tmp_path / "embeddings")
    real_engine.set_budget(None)
    return Held(real_engine)


def make_app(engine, tmp_path: Path, *, save=None, debug=False, seed_locked=False, budget=None, **params) -> SdtermApp:
    history = History(history_file())
    session = Session(Params(**{**SMALL, **params}), history, seed_locked=seed_locked, budget=budget)
    service = RenderService(engine, tmp_path / "out", history)
    if save is not None:
        service.save = save  # (params, result) -> path: a stand-in for the service's own, e.g. a full disk
    return SdtermApp(service, session, image_protocol="halfcell", debug=debug)


# --------------------------------------------------------------------------------------------
# Driving and reading the screen
# --------------------------------------------------------------------------------------------


async def wait_until(pilot, condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await pilot.pause(0.05)


async def settle(pilot) -> None:
    """Wait until no render is running or queued."""
    await pilot.pause(0.05)
    await wait_until(pilot, lambda: not pilot.app.busy or not pilot.app.is_running, "the render to finish")
    assert pilot.app.is_running, "the app stopped"


async def held_reached(pilot, engine: Held) -> None:
    """Wait until the held render is at its first step, on the screen too."""
    await wait_until(pilot, engine.reached.is_set, "the held render's first step")
    await wait_until(pilot, lambda: drawn(pilot.app.query_one("#rate"))[0].startswith("step 1/"), "step 1 on screen")


async def enter(pilot, text: str, *, typed: bool = False) -> None:
    """Clear the prompt box (End, Ctrl+U), put ``text`` in and press Enter. The text is typed key
    by key when ``typed``, else pasted (one bracketed-paste event, as a terminal sends it: about
    60 ms a key adds up over a list of commands)."""
    pilot.app.query_one("#prompt", Input).focus()
    await pilot.press("end", "ctrl+u")
    if typed:
        await pilot.press(*text)
    else:
        pilot.app.post_message(events.Paste(text))
        await pilot.pause()
    assert pilot.app.query_one("#prompt", Input).value == text
    await pilot.press("enter")


async def render(pilot, prompt: str, *, typed: bool = False) -> None:
    await enter(pilot, prompt, typed=typed)
    await settle(pilot)


def notice(app) -> str:
    return str(app.query_one("#notice", Static).render())


def drawn(widget) -> list[str]:
    """The widget's lines as drawn on the screen (trailing spaces dropped)."""
    region = Region(0, 0, widget.size.width, widget.size.height)
    return [strip.text.rstrip() for strip in widget.render_lines(region)]


def stage_state(app, title: str) -> str:
    """The state column of one row of the stage panel, as drawn ('text enc', 'U-Net', 'VAE')."""
    for line in drawn(app.query_one("#stages")):
        if line.startswith(title):
            return line[len(title) :].strip().split("  ")[0]
    raise AssertionError(f"no {title!r} row in the stage panel: {drawn(app.query_one('#stages'))}")


def error_styled(widget) -> bool:
    """True when the widget's first line is drawn bold in red (the notice line's error style)."""
    segments = [seg for seg in widget.render_lines(Region(0, 0, widget.size.width, 1))[0] if seg.text.strip()]
    colors = [seg.style.color.get_truecolor() for seg in segments]
    bold = all(seg.style.bold for seg in segments)
    return bool(segments) and bold and all(c.red > 2 * max(c.green, c.blue) for c in colors)


def caption(app) -> str:
    return str(app.query_one("#caption", Static).render())


def outputs(tmp_path: Path) -> list[str]:
    """Every name in the output folder, hidden temporary files included."""
    out = tmp_path / "out"
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def history_lines() -> list[dict]:
    path = history_file()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def png_parameters(path: Path) -> str:
    with Image.open(path) as im:
        return im.text["parameters"]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


async def test_prompt_renders_saves_records_and_reports(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        assert "demo model" in str(app.query_one("#banner", Static).render())
        assert app.focused is app.query_one("#prompt")
        await render(pilot, "a red fox", typed=True)

        seed = app.session.params.seed
        assert [r.seed for r in engine.requests] == [seed] and engine.outcomes == ["done"]
        name = f"00000-{seed}.png"
        assert outputs(tmp_path) == [name]
        path = tmp_path / "out" / name
        with Image.open(path) as im:
            assert im.size == (64, 64)
        assert "Steps: 3" in png_parameters(path) and f"Seed: {seed}" in png_parameters(path)

        # The notice line shows the saved path; the panel and the caption tell what happened.
        assert notice(app).startswith(f"saved {path}")
        assert "text encoder cache miss" in notice(app)
        assert drawn(app.query_one("#notice"))[0].startswith(" saved /")
        assert [stage_state(app, t) for t in ("text enc", "U-Net", "VAE")] == ["done", "done", "done"]
        assert "step 3/3" in drawn(app.query_one("#rate"))[0]
        assert f"seed {seed} · 64×64" in caption(app)
        assert app.query_one("#picture").image is not None

        (entry,) = history_lines()
        assert entry["prompt"] == "a red fox" and entry["seed"] == seed
        assert (entry["steps"], entry["width"], entry["height"]) == (3, 64, 64)
        assert Path(entry["path"]) == path


async def test_repeated_prompt_is_a_text_encoder_cache_hit(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        assert stage_state(app, "text enc") == "done"
        await pilot.press("enter")  # the same prompt again: unlocked, so a new seed
        await settle(pilot)
        assert stage_state(app, "text enc") == "cache hit"
        assert "text encoder cache hit" in notice(app)
        first, second = (r.seed for r in engine.requests)
        assert first != second
        assert outputs(tmp_path) == [f"00000-{first}.png", f"00001-{second}.png"]
        assert [e["seed"] for e in history_lines()] == [first, second]


async def test_history_survives_a_restart_and_up_recalls_the_prompts(engine, tmp_path):
    fox = dict(seed=1234, seed_locked=True, steps=4, cfg=5.0, width=80, height=64, negative="blurry")
    app = make_app(engine, tmp_path, **fox)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        for command in ("/steps 3", "/cfg 7", "/size 64x64", "/neg", "/seed 99"):
            await enter(pilot, command)
        await render(pilot, "owl")
    assert [e["prompt"] for e in history_lines()] == ["fox", "owl"]

    # A new app, as after a restart, with other settings; the history comes from the file.
    app = make_app(engine, tmp_path, seed=5, seed_locked=True, negative="sharp")
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        await pilot.press(*"dra")
        await pilot.press("up")
        assert box.value == "owl" and app.query_one("#negative", Input).value == ""
        await pilot.press("up")
        assert box.value == "fox" and app.query_one("#negative", Input).value == "blurry"
        p = app.session.params
        # The words come back; the settings of this session stay (Ctrl+R and !N restore those).
        assert (p.seed, p.steps, p.cfg, p.width, p.height, p.negative) == (5, 3, 7.5, 64, 64, "blurry")
        assert "settings kept" in notice(app) and "seed 1234 · 4 steps · CFG 5 · 80×64" in notice(app)
        await pilot.press("up")  # already at the oldest: stays
        assert box.value == "fox"
        await pilot.press("down")
        assert box.value == "owl"
        await pilot.press("down")  # past the newest: the draft comes back
        assert box.value == "dra"

        # Enter on the recalled prompt renders it with this session's settings.
        await pilot.press("up", "up", "enter")
        await settle(pilot)
        assert (engine.requests[-1].prompt, engine.requests[-1].seed, engine.requests[-1].negative) == ("fox", 5, "blurry")
        assert outputs(tmp_path)[-1] == "00002-5.png"
        assert "Negative prompt: blurry" in png_parameters(tmp_path / "out" / "00002-5.png")
        assert len(history_lines()) == 3


async def test_unreadable_history_lines_are_moved_aside_and_reported(engine, tmp_path):
    history_file().parent.mkdir(parents=True, exist_ok=True)
    history_file().write_text('not json\n{"prompt": "half a line', encoding="utf-8")
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        bad = history_file().with_name("history.jsonl.bad")
        assert notice(app) == f"history: moved 2 unreadable line(s) to {bad}"
        assert bad.read_text(encoding="utf-8").splitlines() == ["not json", '{"prompt": "half a line']
        await pilot.press("up")
        assert app.query_one("#prompt", Input).value == ""
        await render(pilot, "fox")
    # The file was rewritten without them; the new render is the one line, whole.
    lines = history_file().read_text(encoding="utf-8").split("\n")
    assert lines[1:] == [""] and json.loads(lines[0])["prompt"] == "fox"


async def test_history_search_restores_the_chosen_entry(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=11, seed_locked=True, cfg=6.0)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        await enter(pilot, "/seed 22")
        await enter(pilot, "/cfg 8")
        await render(pilot, "owl")

        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the history search")
        await pilot.press(*"fox")
        commands = app.screen.query_one(CommandList)
        await wait_until(pilot, lambda: commands.option_count == 1 and commands.highlighted == 0, "one match")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, CommandPalette), "the search to close")

        assert app.query_one("#prompt", Input).value == "fox"
        assert app.focused is app.query_one("#prompt")
        assert (app.session.params.seed, app.session.params.cfg) == (11, 6.0)
        await pilot.press("enter")
        await settle(pilot)
        asked = [(r.prompt, r.seed, r.cfg) for r in engine.requests]
        assert asked == [("fox", 11, 6.0), ("owl", 22, 8.0), ("fox", 11, 6.0)]


# --------------------------------------------------------------------------------------------
# User text is never markup (issue 12): prompts, model names, notices, errors
# --------------------------------------------------------------------------------------------

BRACKETED = ["[/snow]", "a fox in [snow]", "(red:1.3) [blurry]", "[b]bold[/b]", "\\[x]"]


def seed_history(prompts) -> None:
    from sdterm.history import HistoryEntry

    history = History(history_file())
    for i, prompt in enumerate(prompts):
        history.append(HistoryEntry.now(Params(prompt=prompt, seed=100 + i, **SMALL), None, "0" * 10))


def screen_text(app) -> str:
    """The whole screen as drawn, borders included, one line per row."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def palette_lines(app) -> list[str]:
    """The command palette's options as drawn, one per line (prompt lines and help lines)."""
    return [line.strip() for line in drawn(app.screen.query_one(CommandList)) if line.strip()]


@pytest.mark.parametrize("key", ["ctrl+r", "ctrl+p"])
async def test_history_search_shows_bracketed_prompts_exactly(engine, tmp_path, key):
    seed_history(BRACKETED)
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        # Opened empty: every prompt listed as written (newest first), none parsed as markup.
        await pilot.press(key)
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the history search")
        commands = app.screen.query_one(CommandList)
        await wait_until(pilot, lambda: commands.option_count == len(BRACKETED), "every entry listed")
        shown = palette_lines(app)
        for prompt in BRACKETED:
            assert prompt in shown, (prompt, shown)

        # A query: the match is highlighted (spans on plain text), the text intact.
        await pilot.press(*"snow")
        await wait_until(pilot, lambda: commands.option_count == 2, "two matches for 'snow'")
        shown = palette_lines(app)
        assert "[/snow]" in shown and "a fox in [snow]" in shown, shown
        prompt = commands.get_option_at_index(0).prompt
        assert prompt.plain.split("\n")[0] in ("[/snow]", "a fox in [snow]")
        assert any(span.style for span in prompt.spans), "the fuzzy match is not highlighted"

        await pilot.press("end", "ctrl+u", *"blurry")
        await wait_until(pilot, lambda: commands.option_count == 1, "one match for 'blurry'")
        await pilot.press("enter")
        await wait_until(pilot, lambda: not isinstance(app.screen, CommandPalette), "the search to close")
        assert app.query_one("#prompt", Input).value == "(red:1.3) [blurry]"
        assert app.session.params.seed == 102
        assert app.is_running


async def test_up_recalls_a_bracketed_prompt_and_it_renders(engine, tmp_path):
    seed_history(["[/snow]"])
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("up")
        assert app.query_one("#prompt", Input).value == "[/snow]"
        await pilot.press("enter")
        await settle(pilot)
        assert engine.requests[-1].prompt == "[/snow]"
        assert notice(app).startswith("saved ")


async def test_a_bracketed_model_name_is_shown_in_full(demo_model, tmp_path):
    import shutil

    folder = shutil.copytree(demo_model, tmp_path / "demo [fp16]")
    app = make_app(Held(Engine(open_model(folder), "cpu")), tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        assert str(app.query_one("#params", Static).render()).endswith("· model demo [fp16]")
        assert "model demo [fp16]" in screen_text(app)  # the stage panel's border title


async def test_notices_and_errors_with_brackets_are_shown_as_written(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        app.notice("a notice with [/red] and [b]not bold[/b]", "warning")
        await pilot.pause()
        assert notice(app) == "a notice with [/red] and [b]not bold[/b]"
        await enter(pilot, "/steps [/oops]")
        await pilot.pause()
        assert "[/oops]" in notice(app) and error_styled(app.query_one("#notice"))
        await enter(pilot, "/load [x] missing.png")
        await pilot.pause()
        assert "[x] missing.png" in notice(app) and error_styled(app.query_one("#notice"))
        app.query_one(ImageView).show(Image.new("RGB", (8, 8)), "caption [/i] [b]x")
        await pilot.pause()
        assert caption(app) == "caption [/i] [b]x"
        assert app.is_running


# --------------------------------------------------------------------------------------------
# Focus and keys
# --------------------------------------------------------------------------------------------


async def test_tab_moves_focus_between_prompt_image_and_negative(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        prompt, view, negative = app.query_one("#prompt"), app.query_one(ImageView), app.query_one("#negative")
        assert app.focused is prompt
        await pilot.press("tab")
        assert app.focused is view
        await pilot.press("shift+tab")
        assert app.focused is prompt
        await pilot.press("tab", "tab")
        assert app.focused is negative
        await pilot.press("tab")
        assert app.focused is prompt
        await pilot.press("shift+tab")
        assert app.focused is negative


async def test_typing_in_the_prompt_is_never_hijacked(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=7)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"]rlvV[?")
        assert app.query_one("#prompt", Input).value == "]rlvV[?"
        assert app.focused is app.query_one("#prompt")
        assert not isinstance(app.screen, HelpScreen)
        assert app.session.params == Params(**SMALL, seed=7)
        assert engine.requests == [] and not app.busy
        # The negative prompt box too.
        await pilot.press("tab", "tab", *"]rlv")
        assert app.query_one("#negative", Input).value == "]rlv"
        assert app.session.params.negative == "]rlv" and engine.requests == []


async def test_seed_and_variation_keys_rerender(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=100, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("tab", "right_square_bracket")
        assert "nothing rendered yet" in notice(app) and engine.requests == []

        await render(pilot, "fox")
        await pilot.press("tab", "right_square_bracket")
        await settle(pilot)
        assert app.session.params.seed == 101 and "seed 101 · 64×64" in caption(app)
        await pilot.press("left_square_bracket")
        await settle(pilot)
        assert app.session.params.seed == 100
        await pilot.press("r")
        await settle(pilot)
        rerolled = app.session.params.seed
        assert rerolled != 100 and app.session.seed_locked

        await pilot.press("l")
        assert not app.session.seed_locked and "seed unlocked" in notice(app)
        assert "(locked)" not in str(app.query_one("#params", Static).render())
        await pilot.press("l")
        assert app.session.seed_locked and "seed locked" in notice(app)
        assert str(app.query_one("#params", Static).render()).startswith(f"seed {rerolled} (locked)")

        await pilot.press("v")
        await settle(pilot)
        assert app.session.params.subseed_strength == 0.05
        variation_seed = app.session.params.subseed
        assert f"var 0.05@{variation_seed}" in str(app.query_one("#params", Static).render())
        await pilot.press("V")
        await settle(pilot)
        assert app.session.params.subseed_strength == 0.0

        # Seed 100 (after [) and the unvaried image (after V) were made already: shown, not rendered.
        assert [r.prompt for r in engine.requests] == ["fox"] * 4
        assert [r.seed for r in engine.requests] == [100, 101, rerolled, rerolled]
        assert [r.subseed_strength for r in engine.requests] == [0, 0, 0, 0.05]
        assert engine.requests[3].subseed == variation_seed
        assert len(outputs(tmp_path)) == 4
        lines = history_lines()
        assert [e["seed"] for e in lines] == [100, 101, rerolled, rerolled]
        assert [e["variation"] for e in lines] == [0, 0, 0, 0.05]
        assert app.focused is app.query_one(ImageView)


async def test_variation_down_at_zero_does_nothing_and_says_so(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        await pilot.press("tab", "V")
        assert not app.busy and len(engine.requests) == 1
        assert "nothing rendered yet" not in notice(app), notice(app)


async def test_escape_cancels_at_the_next_step_and_writes_nothing(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "fox")
        await held_reached(pilot, engine)
        assert app.busy and stage_state(app, "U-Net") == "running"
        assert "step 1/3" in drawn(app.query_one("#rate"))[0]
        await pilot.press("escape")
        assert notice(app) == "cancelling at the next step…"
        engine.release()
        await settle(pilot)

        assert engine.outcomes == ["cancelled"] and engine.steps_done == [1]
        assert notice(app) == "cancelled: nothing was written"
        assert stage_state(app, "U-Net") == "cancelled"
        assert outputs(tmp_path) == [] and history_lines() == []
        assert app.last_result is None

        # The app is ready for the next render.
        await pilot.press("enter")
        await settle(pilot)
        assert engine.outcomes == ["cancelled", "done"] and len(outputs(tmp_path)) == 1


async def test_a_tweak_during_a_render_replaces_the_pending_one(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=500, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "fox")
        await held_reached(pilot, engine)
        await pilot.press("tab", *["right_square_bracket"] * 5)
        assert notice(app) == "queued seed 505 after this render (replaces the earlier queued render)"
        engine.release()
        await settle(pilot)

        assert len(engine.requests) <= 2
        assert [r.seed for r in engine.requests] == [500, 505]
        assert engine.outcomes == ["done", "done"]
        assert app.session.params.seed == 505
        assert outputs(tmp_path) == ["00000-500.png", "00001-505.png"]
        assert [e["seed"] for e in history_lines()] == [500, 505]
        assert "seed 505" in caption(app)


async def test_escape_also_drops_the_queued_render(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=500, seed_locked=True)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "fox")
        await held_reached(pilot, engine)
        await pilot.press("tab", "right_square_bracket", "escape")
        engine.release()
        await settle(pilot)
        assert [r.seed for r in engine.requests] == [500] and engine.outcomes == ["cancelled"]
        assert outputs(tmp_path) == [] and history_lines() == []


async def test_a_budget_change_during_a_render_waits_for_it(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "fox")
        await held_reached(pilot, engine)
        await enter(pilot, "/budget 1G")
        assert notice(app) == "VRAM budget 1G: no effect here, rendering on the CPU (after this render)"
        assert engine.budget is None and app.busy
        engine.release()
        await settle(pilot)
        assert engine.budget == 2**30 and app.session.budget == 2**30
        assert engine.outcomes == ["done"]


async def test_ctrl_q_quits_and_cancels_the_render_in_flight(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        engine.hold()
        await enter(pilot, "fox")
        await held_reached(pilot, engine)
        await pilot.press("ctrl+q")
        engine.release()
        await wait_until(pilot, lambda: not app.is_running, "the app to exit")
    assert engine.idle.wait(TIMEOUT)
    assert engine.outcomes == ["cancelled"] and engine.steps_done == [1]
    assert outputs(tmp_path) == [] and history_lines() == []
    assert app.return_code == 0


async def test_ctrl_q_quits_from_the_image_too(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("tab", "ctrl+q")
        await wait_until(pilot, lambda: not app.is_running, "the app to exit", timeout=5)
    assert app.return_code == 0 and engine.requests == []


async def test_slash_quit_quits(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/quit")
        await wait_until(pilot, lambda: not app.is_running, "the app to exit", timeout=2)
    assert app.return_code == 0


async def test_help_screen(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("tab", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "Ctrl+R" in app.screen.query_one("Markdown").source
        await pilot.press("question_mark")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        assert app.focused is app.query_one(ImageView)

        await enter(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


# --------------------------------------------------------------------------------------------
# Slash commands
# --------------------------------------------------------------------------------------------


async def test_slash_commands_set_the_next_render(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        box = app.query_one("#prompt", Input)
        expected = [
            ("/seed 7", "seed 7 (locked)"),
            ("/steps 4", "steps 4"),
            ("/cfg 5.5", "CFG 5.5"),
            ("/size 80x64", "size 80×64"),
            ("/neg blurry", "negative prompt: blurry"),
            ("/eta 0.5", "eta 0.5"),
            ("/budget 1G", "VRAM budget 1G: no effect here, rendering on the CPU"),
            ("/open", "nothing saved yet: render a prompt first"),
        ]
        for command, message in expected:
            await enter(pilot, command)
            assert notice(app) == message, command
            assert box.value == "", command
        p, s = app.session.params, app.session
        assert (p.seed, s.seed_locked, p.steps, p.cfg, p.width, p.height, p.negative, p.eta, s.budget) == (
            7, True, 4, 5.5, 80, 64, "blurry", 0.5, 2**30)
        assert engine.budget == 2**30
        assert app.query_one("#negative", Input).value == "blurry"
        assert str(app.query_one("#params", Static).render()) == (
            "seed 7 (locked) · 4 steps · CFG 5.5 · 80×64 · eta 0.5 · budget 1G · model demo")
        await enter(pilot, "/budget auto")
        assert notice(app) == "VRAM budget automatic: no effect here, rendering on the CPU" and engine.budget is None
        await enter(pilot, "/cache")
        assert notice(app) == f"embedding cache {engine.cache.folder}: 0 entries, 0 KiB of 256 MiB"
        assert engine.requests == []

        await render(pilot, "fox")
        path = tmp_path / "out" / "00000-7.png"
        assert outputs(tmp_path) == [path.name]
        with Image.open(path) as im:
            assert im.size == (80, 64)
        info = png_parameters(path)
        parts = ("Negative prompt: blurry", "Steps: 4", "CFG scale: 5.5", "Seed: 7", "Size: 80x64", "Eta DDIM: 0.5")
        for part in parts:
            assert part in info
        await enter(pilot, "/open")
        assert notice(app) == f"showing {path}" and caption(app).startswith(path.name)
        await enter(pilot, "/cache")
        assert notice(app).startswith(f"embedding cache {engine.cache.folder}: 2 entries")
        # in the units `sdterm doctor` and `sdterm cache stats` use (it said "0M" here while
        # doctor said "116 KiB" for the same folder)
        from sdterm.units import format_bytes

        size = format_bytes(engine.cache.stats().bytes)
        assert size != "0 KiB" and notice(app).endswith(f"2 entries, {size} of 256 MiB")


BAD_COMMANDS = [
    ("/frobnicate", "unknown command /frobnicate"),
    ("/stesp 4", "did you mean /steps?"),
    ("/", "type a command after the slash"),
    ("/steps", "/steps needs a value"),
    ("/steps abc", "steps must be a whole number"),
    ("/steps 0", "steps must be between 1 and 1000"),
    ("/steps 4 5", "/steps takes one value"),
    ("/seed -1", "seed must be between"),
    ("/cfg x", "cfg must be a finite number"),
    ("/eta 2", "eta must be between"),
    ("/size 10", "size must be WIDTHxHEIGHT"),
    ("/size 65x64", "multiple of 8"),
    ("/budget 1M", "budget must be at least 256M"),
    ("/budget lots", "budget"),
    ("/open now", "no image 'now'"),
    ("/quit please", "/quit takes no argument"),
]


async def test_unknown_or_malformed_commands_give_one_line(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        before = Params(**SMALL, seed=app.session.params.seed)
        for command, part in BAD_COMMANDS:
            await enter(pilot, command)
            text = notice(app)
            assert part in text, (command, text)
            assert "\n" not in text and "Traceback" not in text, command
            assert len(drawn(app.query_one("#notice"))) == 1
            assert app.session.params == before, command
            assert app.is_running and not isinstance(app.screen, HelpScreen)
        assert engine.requests == [] and outputs(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Failures
# --------------------------------------------------------------------------------------------


async def test_a_save_failure_shows_an_error_and_keeps_the_image(engine, tmp_path):
    def full_disk(params, result):
        raise OSError(errno.ENOSPC, "No space left on device")

    app = make_app(engine, tmp_path, save=full_disk)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        seed = app.session.params.seed
        text = notice(app)
        assert text.startswith(f"cannot write to {tmp_path / 'out'} (No space left on device)"), text
        assert "kept on screen" in text
        assert error_styled(app.query_one("#notice"))
        assert app.last_result is not None and app.last_result.image.size == (64, 64)
        assert app.query_one("#picture").image is app.last_result.image
        assert f"seed {seed} · 64×64" in caption(app)
        assert outputs(tmp_path) == []
        assert app.is_running


def broken_generate(exc: BaseException):
    def generate(request, *, emit, cancelled, **options):  # preview, trail, fork
        raise exc

    return generate


def exit_report(app) -> tuple[int, str]:
    """What ``sdterm`` prints and returns once the app has exited."""
    import io

    from sdterm.cli.app import app_exit_code

    stream = io.StringIO()
    return app_exit_code(app, stream), stream.getvalue()


async def test_a_bug_in_a_render_is_called_a_bug_with_its_traceback_logged(engine, tmp_path, monkeypatch):
    from sdterm.errors import EXIT_INTERNAL, error_log_file

    monkeypatch.delenv("SDTERM_DEBUG", raising=False)
    monkeypatch.setattr(engine._engine, "generate", broken_generate(ZeroDivisionError("division by zero")))
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        log = error_log_file()
        text = notice(app)
        assert text == f"internal error (a bug; traceback in {log}): ZeroDivisionError: division by zero"
        assert "Traceback" not in text and error_styled(app.query_one("#notice"))
        assert engine.outcomes == ["ZeroDivisionError"] and outputs(tmp_path) == []
        assert "ZeroDivisionError: division by zero" in log.read_text() and "in generate" in log.read_text()
        assert len(app.internal_errors) == 1 and app.error_log == log

        monkeypatch.undo()  # the engine works again: so does the app
        await render(pilot, "fox")
        assert engine.outcomes[-1] == "done" and len(outputs(tmp_path)) == 1 and notice(app).startswith("saved ")
    code, printed = exit_report(app)
    assert code == EXIT_INTERNAL
    assert printed == f"sdterm: internal error: 1 render(s) failed on a bug (the tracebacks are in {log})\n"


async def test_with_debug_the_app_prints_the_tracebacks_when_it_exits(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(engine._engine, "generate", broken_generate(RuntimeError("boom")))
    monkeypatch.setenv("SDTERM_DEBUG", "1")
    app = make_app(engine, tmp_path)  # SDTERM_DEBUG=1 without --debug
    assert app.print_tracebacks and make_app(engine, tmp_path, debug=True).print_tracebacks
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        assert notice(app).startswith("internal error (a bug; traceback in ")
        assert notice(app).endswith("RuntimeError: boom")
    code, printed = exit_report(app)
    assert code == 70
    lines = printed.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "RuntimeError: boom" in lines
    assert lines[-1] == "sdterm: internal error: 1 render(s) failed on a bug (the tracebacks are above)"


async def test_a_bug_while_saving_is_a_bug_too(engine, tmp_path, monkeypatch):
    """Not an OSError: not "cannot write", and the worker does not take the app down."""
    monkeypatch.delenv("SDTERM_DEBUG", raising=False)

    def buggy_save(params, result):
        return {}["path"]

    app = make_app(engine, tmp_path, save=buggy_save)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        assert notice(app).startswith("internal error (a bug; traceback in ")
        assert notice(app).endswith("KeyError: 'path'") and app.is_running
    assert exit_report(app)[0] == 70


@pytest.mark.parametrize(
    "exc, shown",
    [
        (ConfigError("width must be a multiple of 8, got 100"), "width must be a multiple of 8, got 100"),
        (ConfigError("bad [bold red]markup[/] stays text"), "bad [bold red]markup[/] stays text"),
        (OSError(errno.EACCES, "Permission denied", "/models/x.safetensors"), "/models/x.safetensors: Permission denied"),
    ],
    ids=["ConfigError", "markup", "OSError"],
)
async def test_a_known_failure_in_a_render_is_one_plain_line(exc, shown, engine, tmp_path, monkeypatch):
    monkeypatch.setattr(engine._engine, "generate", broken_generate(exc))
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        assert notice(app) == shown
        assert drawn(app.query_one("#notice"))[0].strip() == shown  # drawn as written: no markup parsed
        assert error_styled(app.query_one("#notice"))
        assert app.internal_errors == [] and app.is_running
    assert exit_report(app) == (0, "")


async def test_out_of_gpu_memory_in_a_render_is_the_oom_line(engine, tmp_path, monkeypatch):
    import torch

    from sdterm.errors import OOM_HINT

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine._engine, "generate", broken_generate(oom))
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "fox")
        assert notice(app) == f"out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB ({OOM_HINT})"
        assert app.internal_errors == []


async def test_a_history_write_failure_is_reported_not_fatal(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        history_file().mkdir(parents=True)  # a folder where the file should be: the append fails
        await render(pilot, "fox")
        assert app.is_running
        assert len(outputs(tmp_path)) == 1
        assert "history" in notice(app)


async def test_load_takes_the_parameters_stored_in_a_png(engine, tmp_path):
    """/load IMAGE.png restores the prompt and settings written by sdterm (or AUTOMATIC1111)."""
    from PIL import Image, PngImagePlugin

    png = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse\nNegative prompt: fog\n"
                                "Steps: 4, Sampler: DDIM, CFG scale: 6, Seed: 77, Size: 64x48, Model: x")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*f"/load {png}")
        await pilot.press("enter")
        await pilot.pause()
        assert app.query_one("#prompt").value == "a lighthouse"
        assert app.query_one("#negative").value == "fog"
        p = app.session.params
        assert (p.seed, p.steps, p.cfg, p.width, p.height) == (77, 4, 6.0, 64, 48)
        await pilot.press("enter")
        for _ in range(400):
            await pilot.pause(0.05)
            if not app.busy:
                break
        assert outputs(tmp_path)[-1].endswith("-77.png")
        app.query_one("#prompt").value = ""
        await pilot.press(*"/load nowhere.png")
        await pilot.press("enter")
        await pilot.pause()
        assert "nowhere.png" in notice(app)


async def test_memory_sparkline_is_flat_until_there_is_something_to_plot(engine, tmp_path):
    """Textual draws a single value as a full-height bar: before any render (and after the first
    sample of one) the sparkline must be a flat baseline, not a full bar (issue 12)."""
    from rich.console import Console
    from textual.widgets import Sparkline

    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        spark = app.query_one("#mem-spark", Sparkline)
        console = Console(width=40, record=True)
        console.print(spark.render())
        assert "█" not in console.export_text()
        await render(pilot, "a fox")
        assert len(spark.data) != 1


async def test_ctrl_p_opens_the_history_search_not_a_commands_promise(engine, tmp_path):
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+p")
        await settle(pilot)
        assert isinstance(app.screen, CommandPalette)
        assert app.screen.query_one(Input).placeholder == "search earlier prompts…"


async def test_budget_on_the_cpu_says_it_has_no_effect(engine, tmp_path):
    assert engine.device.type == "cpu"
    app = make_app(engine, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await enter(pilot, "/budget 2G")
        assert notice(app) == "VRAM budget 2G: no effect here, rendering on the CPU"
