"""The UI-free session: history on disk, recall, search, slash commands, seed and variation."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from sdterm.commands import COMMANDS, Command, CommandError, Outcome, parse_command
from sdterm.errors import ConfigError
from sdterm.history import History, HistoryEntry
from sdterm.params import Params, batch
from sdterm.session import Session


def entry(prompt: str = "a red fox", *, time: str = "2024-05-01T12:00:00+00:00", path: str | None = "outputs/00000-1.png",
          model_hash: str = "abcd1234", **params) -> HistoryEntry:
    return HistoryEntry(Params(prompt, **{"seed": 1, **params}), path, model_hash, time)


def session(tmp_path: Path, rng_seed: int = 7, *, seed_locked: bool = False, budget: int | None = None,
            **params) -> Session:
    return Session(Params(**params), History(tmp_path / "h" / "history.jsonl"), random.Random(rng_seed),
                   seed_locked=seed_locked, budget=budget)


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message


# ---- commands -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/seed 42", Command("seed", "42")),
        ("/steps 30", Command("steps", "30")),
        ("/cfg 7.5", Command("cfg", "7.5")),
        ("/size 512x768", Command("size", "512x768")),
        ("/size 512 x 768", Command("size", "512 x 768")),
        ("/neg blurry,  low quality ", Command("neg", "blurry,  low quality")),
        ("/neg", Command("neg", "")),
        ("/eta 0.5", Command("eta", "0.5")),
        ("/budget 2G", Command("budget", "2G")),
        ("/budget auto", Command("budget", "auto")),
        ("/open", Command("open", "")),
        ("/cache", Command("cache", "")),
        ("/help", Command("help", "")),
        ("/quit", Command("quit", "")),
        ("  /STEPS\t30  ", Command("steps", "30")),
        ("/exit", Command("quit", "")),
    ],
)
def test_parse_command(text, expected):
    assert parse_command(text) == expected


@pytest.mark.parametrize("text", ["a red fox", "", "   ", "photo of a/b test"])
def test_parse_command_none_for_prompts(text):
    assert parse_command(text) is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("/", "command"),
        ("/frobnicate", "unknown command /frobnicate"),
        ("/sed 5", "did you mean /seed?"),
        ("/steps", "/steps needs a value"),
        ("/seed", "/seed needs a value"),
        ("/size", "/size needs a value"),
        ("/budget", "/budget needs a value"),
        ("/steps 30 40", "/steps takes one value"),
        ("/quit now", "/quit takes no argument"),
        ("/cache now", "/cache takes no argument"),
        ("/x" + "y" * 500, "unknown command"),
    ],
)
def test_parse_command_errors_are_one_line(text, fragment):
    with pytest.raises(CommandError) as info:
        parse_command(text)
    message = str(info.value)
    assert one_line(message) and fragment in message
    listed = " ".join(f"/{name}" for name in COMMANDS)  # the list of commands grows with the registry
    assert len(message) < len(listed) + 40  # the rest stays short: a long name typed is shortened


def test_unknown_command_lists_the_commands():
    with pytest.raises(CommandError) as info:
        parse_command("/zzzz")
    assert all(f"/{name}" in str(info.value) for name in COMMANDS)
    with pytest.raises(CommandError) as info:  # a close name: that one, and where the list is
        parse_command("/nope")
    assert "did you mean /open?" in str(info.value) and "/help" in str(info.value)


def test_apply_sets_values_without_rendering(tmp_path):
    s = session(tmp_path)
    cases = [
        ("/steps 30", Outcome("message", "steps 30"), dict(steps=30)),
        ("/cfg 4", Outcome("message", "CFG 4"), dict(cfg=4.0)),
        ("/size 640x448", Outcome("message", "size 640×448"), dict(width=640, height=448)),
        ("/size 512 X 768", Outcome("message", "size 512×768"), dict(width=512, height=768)),
        ("/eta 0.5", Outcome("message", "eta 0.5"), dict(eta=0.5)),
        ("/neg blurry", Outcome("message", "negative prompt: blurry"), dict(negative="blurry")),
        ("/neg", Outcome("message", "negative prompt cleared"), dict(negative="")),
        ("/seed 1234", Outcome("message", "seed 1234 (locked)"), dict(seed=1234, seed_locked=True)),
        ("/budget 2G", Outcome("budget", "VRAM budget 2G"), dict(budget=2 * 2**30)),
        ("/budget 1536M", Outcome("budget", "VRAM budget 1.5G"), dict(budget=1536 * 2**20)),
        ("/budget auto", Outcome("budget", "VRAM budget automatic"), dict(budget=None)),
    ]
    for text, outcome, changed in cases:
        assert s.apply(parse_command(text)) == outcome, text
        for name, value in changed.items():
            where = s if name in ("seed_locked", "budget") else s.params  # session state beside the parameters
            assert getattr(where, name) == value, text
    assert s.last_prompt is None  # nothing rendered


def test_apply_actions(tmp_path):
    s = session(tmp_path)
    opened = s.apply(parse_command("/open"))
    assert opened.action == "message" and "nothing" in opened.message
    s.new_prompt("fox")
    s.last_path = "outputs/00000-1.png"  # what the front end sets once the render service saved it
    assert s.apply(parse_command("/open")) == Outcome("open", "outputs/00000-1.png")
    assert s.apply(parse_command("/cache")).action == "cache"
    helped = s.apply(parse_command("/help"))
    assert helped.action == "help" and one_line(helped.message) and "/steps" in helped.message
    assert s.apply(parse_command("/quit")).action == "quit"


@pytest.mark.parametrize(
    "text, message",
    [
        ("/steps 0", "steps must be between 1 and 1000, got 0"),
        ("/steps abc", "steps must be a whole number, got 'abc'"),
        ("/steps 2.5", "steps must be a whole number, got '2.5'"),
        ("/cfg nan", "cfg must be a finite number, got nan"),
        ("/cfg 51", "cfg must be between 0 and 50, got 51"),
        ("/size 513x512", "width must be a multiple of 8, got 513 (try 512 or 520)"),
        ("/size 512x4", "height must be between 8 and 4096, got 4"),
        ("/size garbage", "size must be WIDTHxHEIGHT such as 512x768, got 'garbage'"),
        ("/eta 2", "eta must be between 0 and 1, got 2"),
        ("/seed -1", "seed must be between 0 and 4294967295, got -1"),
        ("/seed 4294967296", "seed must be between 0 and 4294967295, got 4294967296"),
        ("/budget 100M", "budget must be at least 256M, got 100M"),
        ("/budget garbage", "budget must be a size such as 256M or 1.5G, got 'garbage'"),
    ],
)
def test_apply_bad_values_leave_params_unchanged(tmp_path, text, message):
    s = session(tmp_path)
    before = (s.params, s.seed_locked, s.budget)
    with pytest.raises(CommandError) as info:
        s.apply(parse_command(text))
    assert str(info.value) == message
    assert (s.params, s.seed_locked, s.budget) == before


def test_apply_messages_match_the_cli_validator(tmp_path):
    """The same line as the parameter validator gives the command line."""
    s = session(tmp_path)
    for text, field, value in [("/steps 0", "steps", 0), ("/eta 2", "eta", 2.0), ("/cfg -1", "cfg", -1.0)]:
        with pytest.raises(ConfigError) as cli:
            Params(prompt="x", **{field: value}).validated()
        with pytest.raises(CommandError) as app:
            s.apply(parse_command(text))
        assert str(app.value) == str(cli.value)


# ---- seed, lock, variation ----------------------------------------------------------------------


def test_unlocked_new_prompt_draws_new_seeds_deterministically(tmp_path):
    a, b = session(tmp_path / "a", rng_seed=3), session(tmp_path / "b", rng_seed=3)
    seeds_a = [a.new_prompt("fox").seed for _ in range(3)]
    seeds_b = [b.new_prompt("fox").seed for _ in range(3)]
    assert seeds_a == seeds_b
    assert len(set(seeds_a)) == 3
    assert a.last_prompt == "fox"
    assert a.params.seed == seeds_a[-1]


def test_locked_new_prompt_keeps_the_seed(tmp_path):
    s = session(tmp_path)
    s.apply(parse_command("/seed 1234"))
    assert s.seed_locked
    assert s.new_prompt("fox").seed == 1234
    assert s.new_prompt("owl").seed == 1234
    assert s.toggle_lock() is False
    assert s.new_prompt("owl").seed != 1234
    assert s.toggle_lock() is True


def test_request_is_validated_and_mirrors_params(tmp_path):
    s = session(tmp_path, negative="blurry", seed=5, steps=20, cfg=3.0, width=384, height=640, eta=0.3,
                subseed_strength=0.2, subseed=77)
    req = s.request("fox")
    assert req == Params(prompt="fox", negative="blurry", seed=5, steps=20, cfg=3.0, width=384, height=640,
                         eta=0.3, subseed=77, subseed_strength=0.2)
    assert s.params.prompt == ""  # the session's parameters wait for a prompt
    s.params = s.params.replace(steps=0)
    with pytest.raises(ConfigError):
        s.request("fox")
    seed = s.params.seed
    with pytest.raises(ConfigError):
        s.new_prompt("fox")
    assert s.params.seed == seed and s.last_prompt is None


def test_nudge_and_reroll(tmp_path):
    s = session(tmp_path, seed=10)
    assert s.nudge_seed(1) is None and s.reroll() is None
    assert s.params.seed == 10  # nothing rendered yet: nothing changes
    s.toggle_lock()
    s.new_prompt("fox")
    assert s.nudge_seed(1).seed == 11
    assert s.nudge_seed(-2).seed == 9
    s.params = s.params.replace(seed=2**32 - 1)
    req = s.nudge_seed(1)
    assert req.seed == 0 and req.prompt == "fox"
    assert s.nudge_seed(-1).seed == 2**32 - 1
    rerolled = s.reroll()
    assert rerolled.seed != 2**32 - 1 and rerolled.prompt == "fox"
    assert s.params.seed == rerolled.seed
    assert s.seed_locked  # neither changes the lock


def test_rerun_keeps_the_seed_even_when_unlocked(tmp_path):
    s = session(tmp_path, seed=10)
    req = s.rerun("fox")
    assert (req.prompt, req.seed, s.params.seed, s.last_prompt) == ("fox", 10, 10, "fox")


def test_variation_up_down_clamps(tmp_path):
    s = session(tmp_path, seed=5)
    assert s.change_variation(0.05) is None and s.params.subseed_strength == 0.0
    s.new_prompt("fox")
    first = s.change_variation(0.05)
    assert first.subseed_strength == 0.05 and first.prompt == "fox"
    vseed = s.params.subseed
    assert first.subseed == vseed and vseed != s.params.seed
    assert s.change_variation(0.05).subseed_strength == 0.1  # rounded: not 0.1000000001
    assert s.params.subseed == vseed  # only going up from 0 picks a new one
    s.params = s.params.replace(subseed_strength=0.97)
    assert s.change_variation(0.05).subseed_strength == 1.0
    assert s.change_variation(0.05) is None  # already at the top
    s.params = s.params.replace(subseed_strength=0.03)
    assert s.change_variation(-0.05).subseed_strength == 0.0
    assert s.change_variation(-0.05) is None
    s.change_variation(0.05)
    assert s.params.subseed != vseed  # up from 0 again: a fresh variation seed


# ---- restore, describe --------------------------------------------------------------------------


def test_restore_takes_params_but_not_budget_or_lock(tmp_path):
    s = session(tmp_path, budget=2**30, seed_locked=True)
    e = entry("fox", negative="blurry", seed=99, steps=20, cfg=4.0, width=640, height=384, eta=0.25,
              subseed_strength=0.3, subseed=12)
    s.restore(e.params)
    assert s.params == Params(negative="blurry", seed=99, steps=20, cfg=4.0, width=640, height=384,
                              eta=0.25, subseed_strength=0.3, subseed=12)
    assert (s.seed_locked, s.budget, s.last_prompt) == (True, 2**30, "fox")
    before = s.params
    with pytest.raises(ConfigError):
        s.restore(e.params.replace(steps=0))
    assert s.params == before


def test_describe(tmp_path):
    s = session(tmp_path, seed=1234, seed_locked=True, subseed_strength=0.1, subseed=567)
    assert s.describe() == "seed 1234 (locked) · 50 steps · CFG 7.5 · 512×512 · eta 0 · var 0.10@567 · budget auto"
    s = session(tmp_path, seed=1, steps=1, cfg=7.0, width=768, height=512, eta=0.5, budget=3 * 2**29)
    assert s.describe() == "seed random · 1 step · CFG 7 · 768×512 · eta 0.5 · budget 1.5G"


def test_an_unlocked_seed_shows_what_the_next_render_uses(tmp_path):
    """The parameter line never names a seed the next render won't use (issue 12, bug 4)."""
    s = session(tmp_path, seed=1)
    assert s.describe().startswith("seed random ·")
    first = s.new_prompt("a fox")
    assert s.describe().startswith(f"seed random (last {first.seed}) ·")
    assert s.nudge_seed(1).seed == first.seed + 1  # the seed keys start from the last seed shown
    s.toggle_lock()
    shown = s.describe()
    assert shown.startswith(f"seed {first.seed + 1} (locked)")
    assert s.new_prompt("a cat").seed == first.seed + 1  # locked: the shown seed is the one used
    s.toggle_lock()
    s.restore(first)
    assert s.describe().startswith(f"seed {first.seed} (recalled) ·")
    assert s.rerun("a fox").seed == first.seed  # what the app does on Enter with the recalled prompt
    assert s.describe().startswith(f"seed random (last {first.seed}) ·")


def test_session_module_imports_no_ui():
    code = (
        "import sys, sdterm.session; "
        "bad = [m for m in ('textual', 'rich', 'torch') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- batch count, rerender, recalling history entries ----------------------------------------------


def test_batch_count_shows_on_the_parameter_line_and_renders_stay_single(tmp_path):
    s = session(tmp_path, seed=1234, seed_locked=True)
    assert s.batch_count == 1 and "×" not in s.describe().replace("512×512", "")
    s.apply(parse_command("/n 4"))
    assert s.describe() == "seed 1234 (locked) · ×4 · 50 steps · CFG 7.5 · 512×512 · eta 0 · budget auto"
    request = s.new_prompt("a fox")
    assert isinstance(request, Params) and request.seed == 1234  # one Params: the front end makes the batch
    assert [p.seed for p in batch(request, s.batch_count)] == [1234, 1235, 1236, 1237]
    s.apply(parse_command("/n 1"))
    assert "×1" not in s.describe() and " · ×" not in s.describe()


def test_rerender_uses_the_current_settings_and_seed(tmp_path):
    s = session(tmp_path, seed=5)
    assert s.rerender() is None  # nothing rendered yet
    first = s.new_prompt("a fox")
    s.apply(parse_command("/steps 20"))
    again = s.rerender()
    assert again == first.replace(steps=20)  # same prompt and seed (unlocked or not), new steps
    assert s.last_prompt == "a fox" and s.params.seed == first.seed
    s.params = s.params.replace(cfg=99.0)  # a bad value set behind its back: ConfigError, as rerun gives
    with pytest.raises(ConfigError):
        s.rerender()


def test_recall_entry_by_number_and_by_image(tmp_path):
    s = session(tmp_path)
    with pytest.raises(CommandError, match="the history is empty"):
        s.recall_entry("1")
    entries = [entry(f"p{i}", seed=i, path=f"outputs/{i:05d}-{i}.png") for i in range(3)]
    for e in entries:
        s.history.append(e)
    assert s.recall_entry("2") == (2, entries[1])
    assert s.recall_entry(" 3 ") == (3, entries[2])
    assert s.recall_entry("00000-0.png") == (1, entries[0])
    assert s.recall_entry("outputs/00001-1.png") == (2, entries[1])
    for bad in ("0", "4", "99999999999999999999999"):
        with pytest.raises(CommandError, match=r"\(1 \.\.\. 3\)"):
            s.recall_entry(bad)
    with pytest.raises(CommandError, match="no history entry for the image"):
        s.recall_entry("00009-9.png")
    # what the app does with Outcome("recall", "2")
    number, found = s.recall_entry(s.apply(parse_command("!2")).message)
    s.restore(found.params)
    assert s.last_prompt == "p1" and s.params.seed == 1 and s.recalled
