"""The UI-free session: history on disk, recall, search, slash commands, seed and variation."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sdterm.commands import COMMANDS, Command, CommandError, Outcome, parse_command
from sdterm.errors import ConfigError
from sdterm.history import History, HistoryEntry, Recall, history_file
from sdterm.params import Params
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


# ---- history on disk ----------------------------------------------------------------------------


def test_history_file_is_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTERM_DATA_DIR", str(tmp_path / "data"))
    assert history_file() == tmp_path / "data" / "history.jsonl"


def test_entry_json_round_trip_one_line():
    e = entry("line one\nline two \u2028 «ünïcode»", negative="blurry", path=None, cfg=7.0, subseed_strength=0.25,
              subseed=99, eta=0.5)
    line = e.to_json()
    assert "\n" not in line
    back = HistoryEntry.from_json(line)
    assert back == e
    assert isinstance(back.params.cfg, float)


def test_history_round_trip_creates_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "history.jsonl"
    h = History(path)
    assert h.entries == [] and h.skipped == 0
    a, b = entry("first", seed=1), entry("second \u2028 with a line separator", seed=2, path=None)
    h.append(a)
    h.append(b)
    assert h.entries == [a, b]
    again = History(path)
    assert again.entries == [a, b] and again.skipped == 0
    assert path.read_text(encoding="utf-8").count("\n") == 2


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "[1, 2, 3]",
        '"just a string"',
        "{}",
        json.dumps({**json.loads(entry().to_json()), "seed": "1"}),  # wrong type
        json.dumps({**json.loads(entry().to_json()), "seed": True}),
        json.dumps({**json.loads(entry().to_json()), "cfg": "7.5"}),
        json.dumps({**json.loads(entry().to_json()), "path": 3}),
        json.dumps({**json.loads(entry().to_json()), "steps": 0}),  # out of range
        json.dumps({**json.loads(entry().to_json()), "cfg": 10**400}),
        json.dumps({**json.loads(entry().to_json()), "width": 513}),
        json.dumps({**json.loads(entry().to_json()), "time": "yesterday"}),
        entry().to_json().replace('"cfg":7.5', '"cfg":NaN'),
        {k: v for k, v in json.loads(entry().to_json()).items() if k != "model_hash"},  # missing key
        "[" * 100000,
    ],
)
def test_from_json_rejects_malformed(bad):
    line = bad if isinstance(bad, str) else json.dumps(bad)
    with pytest.raises(ValueError):
        HistoryEntry.from_json(line)


def test_from_json_ignores_unknown_keys():
    data = {**json.loads(entry().to_json()), "added_by_a_newer_sdterm": 1}
    assert HistoryEntry.from_json(json.dumps(data)) == entry()


def test_corrupt_lines_are_skipped_and_later_appends_still_load(tmp_path):
    path = tmp_path / "history.jsonl"
    good = entry("good")
    wrong_type = json.dumps({**json.loads(entry().to_json()), "steps": "many"})
    path.write_bytes(
        (good.to_json() + "\n" + "garbage {\n" + wrong_type + "\n\n").encode() + b"\xff\xfe not utf-8\n"
    )
    h = History(path)
    assert h.entries == [good]
    assert h.skipped == 3
    # A crash in the middle of a write: half a line, no newline at the end.
    torn = entry("torn").to_json()
    with open(path, "ab") as f:
        f.write(torn[: len(torn) // 2].encode())
    h = History(path)
    assert h.entries == [good] and h.skipped == 4
    after = entry("after the crash", seed=3)
    h.append(after)  # must not be glued onto the torn line
    assert h.entries == [good, after]
    reloaded = History(path)
    assert reloaded.entries == [good, after]
    assert reloaded.skipped == 4
    assert path.read_bytes().endswith(b"\n")


def test_two_history_objects_on_one_file_interleave_cleanly(tmp_path):
    path = tmp_path / "history.jsonl"
    one, two = History(path), History(path)
    written = []
    for i in range(10):
        for h, who in ((one, "one"), (two, "two")):
            e = entry(f"{who} {i}", seed=i)
            h.append(e)
            written.append(e)
    loaded = History(path)
    assert loaded.entries == written
    assert loaded.skipped == 0


_APPENDER = """
import sys
from sdterm.history import History, HistoryEntry
from sdterm.params import Params
h = History(sys.argv[1])
for i in range(int(sys.argv[3])):
    h.append(HistoryEntry(Params(sys.argv[2] + " " + "x" * 5000 + str(i), seed=i), None, "h", "2024-05-01T12:00:00+00:00"))
"""


def test_two_processes_appending_at_once_never_tear_lines(tmp_path):
    path = tmp_path / "history.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), who, "40"]) for who in ("one", "two")
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    loaded = History(path)
    assert loaded.skipped == 0
    assert len(loaded.entries) == 80
    for who in ("one", "two"):
        mine = [e.params.seed for e in loaded.entries if e.params.prompt.startswith(who + " ")]
        assert mine == list(range(40))  # each writer's own lines stay in order


def test_append_raises_oserror(tmp_path):
    blocker = tmp_path / "not-a-folder"
    h = History(blocker / "history.jsonl")
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OSError):
        h.append(entry())
    assert h.entries == []


def test_prompts_newest_first_without_consecutive_duplicates(tmp_path):
    h = History(tmp_path / "history.jsonl")
    for e in [
        entry("fox", seed=1),
        entry("fox", seed=1, time="2024-05-02T00:00:00+00:00", path="other.png"),  # same render again
        entry("owl", seed=1),
        entry("fox", seed=1),  # not consecutive with the first two: kept
        entry("fox", seed=2),  # other parameters: kept
        entry("fox", seed=2),
    ]:
        h.append(e)
    assert [(e.params.prompt, e.params.seed) for e in h.prompts()] == [("fox", 2), ("fox", 1), ("owl", 1), ("fox", 1)]


# ---- search -------------------------------------------------------------------------------------


def _history(tmp_path, prompts) -> History:
    h = History(tmp_path / "history.jsonl")
    for i, p in enumerate(prompts):
        h.append(entry(p, seed=i))
    return h


def test_search_fuzzy_subsequence(tmp_path):
    h = _history(tmp_path, ["a red fox", "a blue whale", "portrait of an owl"])
    assert [e.params.prompt for e in h.search("rdfx")] == ["a red fox"]
    assert [e.params.prompt for e in h.search("RED FOX")] == ["a red fox"]
    assert h.search("zebra") == []


def test_search_ranking(tmp_path):
    h = _history(tmp_path, [
        "fox in the snow",          # prefix (oldest)
        "a fox at night",           # word-start substring
        "firefox logo",             # substring inside a word
        "four oxen",                # scattered, newest
        "fancy pink ox",            # scattered
    ])
    assert [e.params.prompt for e in h.search("fox")] == [
        "fox in the snow", "a fox at night", "firefox logo", "four oxen", "fancy pink ox",
    ]


def test_search_prefers_word_starts_then_newer(tmp_path):
    h = _history(tmp_path, ["a red fox", "hardware fix", "surfing"])
    # A contiguous match first; then letters on word starts (r, f of "a red fox") beat letters
    # inside words (r, d of "hardware"), although "hardware fix" is newer.
    assert [e.params.prompt for e in h.search("rf")] == ["surfing", "a red fox", "hardware fix"]
    assert [e.params.prompt for e in h.search("rdfx")] == ["a red fox", "hardware fix"]
    same = _history(tmp_path / "b", ["cat one", "cat two", "cat three"])
    assert [e.params.prompt for e in same.search("cat")] == ["cat three", "cat two", "cat one"]


def test_search_dedupes_and_limits(tmp_path):
    h = History(tmp_path / "history.jsonl")
    for _ in range(3):
        h.append(entry("a red fox"))
    h.append(entry("a red fox", seed=9))
    for i in range(10):
        h.append(entry(f"red {i}"))
    results = h.search("red", limit=100)
    assert sum(e.params.prompt == "a red fox" for e in results) == 2
    assert len(h.search("red", limit=3)) == 3
    assert [e.params.prompt for e in h.search("", limit=2)] == ["red 9", "red 8"]


# ---- recall -------------------------------------------------------------------------------------


def test_recall_older_newer_restores_draft(tmp_path):
    h = _history(tmp_path, ["one", "two", "three"])
    r = Recall(h)
    assert r.newer() is None  # already at the present
    assert r.older("my draft").params.prompt == "three"
    assert r.older("three").params.prompt == "two"  # later calls do not overwrite the draft
    assert r.older("two").params.prompt == "one"
    assert r.older("one") is None  # the oldest: stays
    assert r.newer().params.prompt == "two"
    assert r.newer().params.prompt == "three"
    assert r.newer() == "my draft"
    assert r.newer() is None
    # After a reset the next Up remembers a new draft and starts from the newest again.
    r.older("x")
    r.reset()
    h.append(entry("four"))
    assert r.older("new draft").params.prompt == "four"
    assert r.newer() == "new draft"


def test_recall_empty_history(tmp_path):
    r = Recall(History(tmp_path / "history.jsonl"))
    assert r.older("draft") is None
    assert r.newer() is None


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
        ("/open file.png", "/open takes no argument"),
        ("/x" + "y" * 500, "unknown command"),
    ],
)
def test_parse_command_errors_are_one_line(text, fragment):
    with pytest.raises(CommandError) as info:
        parse_command(text)
    message = str(info.value)
    assert one_line(message) and fragment in message
    assert len(message) < 200


def test_unknown_command_lists_the_commands():
    with pytest.raises(CommandError) as info:
        parse_command("/nope")
    assert all(f"/{name}" in str(info.value) for name in COMMANDS)


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
