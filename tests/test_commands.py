"""The slash-command registry: every entry is whole — the parser takes it, /help and the help screen
list it, the prompt box completes it, and its handler runs — so a command can't be half added."""

from __future__ import annotations

import random

import pytest

from sdterm.commands import (
    ALIASES,
    COMMANDS,
    NO_ARG,
    ONE_VALUE,
    OPTIONAL_VALUE,
    REQUIRED_TEXT,
    TEXT,
    VALUE_SOURCES,
    Command,
    CommandError,
    Outcome,
    complete,
    help_line,
    parse_command,
)
from sdterm.history import History, HistoryEntry
from sdterm.params import MAX_BATCH, Params
from sdterm.session import Session
from sdterm.ui.screens import help_text

# A valid argument for each kind of command, for the check that each entry parses and runs.
SAMPLE_ARGS = {"seed": "7", "steps": "20", "cfg": "5", "size": "64x48", "n": "4", "neg": "blurry", "eta": "0.5", "clipskip": "2",
               "budget": "1G", "open": "a.png", "load": "a.png", "history": "5", "recall": "1", "model": "demo",
               "sampler": "DPM++ 2M Karras", "schedule": "Karras", "rng": "nv", "vae": "ft-mse", "lora": "detail:0.8",
               "draft": "on", "init": "a.png", "strength": "0.6", "verify": "a.png",
               "hires": "2x steps=10", "fork": "3"}
ACTIONS = ("message", "budget", "open", "load", "recall", "history", "model", "vae", "lora", "cache", "help", "quit",
           "fork", "verify")


def session(tmp_path) -> Session:
    return Session(Params(), History(tmp_path / "history.jsonl"), random.Random(0))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_is_listed_completed_parsed_and_handled(name, tmp_path, monkeypatch):
    command = COMMANDS[name]
    assert command.name == name and command.usage.startswith(f"/{name}") and command.help
    assert command.arg in (NO_ARG, ONE_VALUE, OPTIONAL_VALUE, TEXT, REQUIRED_TEXT)
    assert command.values is None or isinstance(command.values, str)
    # /help's line and the help screen
    assert command.usage in help_line().split(" · ")
    assert f"- `{command.usage}`: {command.help}" in help_text()
    # completion: any beginning that no earlier command shares completes to it
    earlier = [n for n in COMMANDS if n != name and list(COMMANDS).index(n) < list(COMMANDS).index(name)]
    prefix = next(name[:i] for i in range(1, len(name) + 1) if not any(n.startswith(name[:i]) for n in earlier))
    assert complete("/" + prefix) == "/" + name + ("" if command.arg == NO_ARG else " ")
    # the parser, with its argument when it takes one (and without when it needs one)
    arg = SAMPLE_ARGS.get(name, "")
    assert (arg != "") == (command.arg != NO_ARG), "add a sample argument for the new command above"
    assert parse_command(f"/{name} {arg}".strip()) == Command(name, arg)
    if command.arg in (ONE_VALUE, REQUIRED_TEXT):
        with pytest.raises(CommandError, match="needs a value"):
            parse_command(f"/{name}")
    if command.arg == NO_ARG:
        with pytest.raises(CommandError, match="takes no argument"):
            parse_command(f"/{name} extra")
    # the handler (through the session), with an image and a history entry to name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    s = session(tmp_path)
    s.history.append(HistoryEntry(Params("fox"), "a.png", "h", "2024-05-01T12:00:00+00:00"))
    outcome = s.apply(Command(name, arg))
    assert isinstance(outcome, Outcome) and outcome.action in ACTIONS


@pytest.mark.parametrize("alias, name", sorted(ALIASES.items()))
def test_aliases_parse_to_their_command_and_are_listed(alias, name):
    assert parse_command(f"/{alias} {SAMPLE_ARGS.get(name, '')}".strip()).name == name
    assert f"/{alias}" in help_text()
    assert alias not in COMMANDS


@pytest.mark.parametrize("text", ["", "/", "fox", "/zzz", "/steps 3", "/st eps"])
def test_no_completion(text):
    assert complete(text) is None


def test_completion_case_and_order():
    assert complete("/S") == "/seed "  # the first in the registry's order
    assert complete("/st") == "/steps "
    assert complete("/q") == "/quit"
    assert complete("/n") == "/n " and complete("/ne") == "/neg "
    assert complete("/h") == "/history " and complete("/he") == "/help" and complete("/hir") == "/hires "


# ---- completing values ------------------------------------------------------------------------------

MODELS = {"model": lambda typed: ["demo", "demo [fp16]", "sd-v1-5", "Anything"]}


@pytest.mark.parametrize("text, expected", [
    ("/model de", "/model demo"),  # "demo" and "demo [fp16]" agree as far as "demo"
    ("/model demo", "/model demo [fp16]"),  # then the first longer one
    ("/model s", "/model sd-v1-5"),
    ("/model an", "/model Anything"),  # no case matches: case-insensitive
    ("/model ", "/model demo"),  # nothing typed: the first, in the source's order
    ("/model zz", None),
    ("/model sd-v1-5", None),  # complete already
    ("/MODEL s", "/MODEL sd-v1-5"),
    ("/steps 3", None),  # a command without a kind of value
])
def test_complete_values_from_a_source(text, expected):
    assert complete(text, MODELS) == expected


def test_complete_values_without_a_source_completes_nothing():
    assert complete("/model de") is None
    assert complete("/model de", {}) is None


def test_a_new_kind_of_value_is_one_entry_and_one_source(monkeypatch):
    """How /sampler will be added: a registry entry naming its kind, a source for the kind."""
    from sdterm import commands

    entry = commands.SlashCommand("sampler", ONE_VALUE, "/sampler NAME", "the sampler",
                                  lambda session, arg: Outcome("message", arg), values="sampler")
    monkeypatch.setitem(commands.COMMANDS, "sampler", entry)
    monkeypatch.setitem(commands.VALUE_SOURCES, "sampler", lambda typed: ["ddim", "euler", "euler_a"])
    assert complete("/sampler d") == "/sampler ddim"
    assert complete("/sampler eu") == "/sampler euler"
    assert complete("/sampler euler_") == "/sampler euler_a"
    assert complete("/sampler euler x") is None  # one value: a second word completes nothing


@pytest.fixture
def pictures(tmp_path, monkeypatch):
    """cwd with out/ (two images, a text file, a sub-folder, a hidden file) and a home folder."""
    out = tmp_path / "work" / "out"
    (out / "sub").mkdir(parents=True)
    for name in ("00042-1234.png", "00043-77.PNG", "notes.txt", ".hidden.png"):
        (out / name).write_bytes(b"")
    home = tmp_path / "home"
    (home / "pictures").mkdir(parents=True)
    (home / "pictures" / "cat.png").write_bytes(b"")
    (home / "pic.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(home))
    return tmp_path


@pytest.mark.parametrize("text, expected", [
    ("/open out/000", "/open out/0004"),  # two images agree as far as that
    ("/open out/00042", "/open out/00042-1234.png"),
    ("/open out/0004", "/open out/00042-1234.png"),  # agreeing no further: the first
    ("/load out/00043", "/load out/00043-77.PNG"),
    ("/load out/no", None),  # not a PNG
    ("/load out/su", "/load out/sub/"),  # folders end in "/"
    ("/load out/.h", "/load out/.hidden.png"),  # hidden names only when typed
    ("/open o", "/open out/"),
    ("/open ~/pictures/c", "/open ~/pictures/cat.png"),  # "~" kept as typed
    ("/open ~/pict", "/open ~/pictures/"),
    ("/load ~/pic", "/load ~/pic.png"),  # pic.png and pictures/ agree as far as "pic", then the first
    ("/open ~", "/open ~/"),
    ("/open nowhere/x", None),
    ("/open out/sub/", None),  # an empty folder
])
def test_complete_paths(pictures, text, expected):
    assert complete(text) == expected
    assert complete(text, MODELS) == expected  # sources for other kinds change nothing here


def test_image_paths_lists_pngs_and_folders(pictures):
    assert VALUE_SOURCES["path"]("out/") == ["out/00042-1234.png", "out/00043-77.PNG", "out/sub/"]
    assert VALUE_SOURCES["path"]("") == ["out/"]
    assert VALUE_SOURCES["path"](str(pictures / "home" / "pic")) == [
        str(pictures / "home" / "pic.png"), str(pictures / "home" / "pictures") + "/"]


# ---- !N, /history, /recall, /n, /open, /model ---------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("!12", Command("recall", "12")),
    ("  !7 ", Command("recall", "7")),
    ("/recall 00042-1234.png", Command("recall", "00042-1234.png")),
    ("/recall my pics/00042-1234.png", Command("recall", "my pics/00042-1234.png")),
    ("/history", Command("history", "")),
    ("/history 5", Command("history", "5")),
    ("/n 4", Command("n", "4")),
    ("/batch 4", Command("n", "4")),
    ("/open", Command("open", "")),
    ("/open out/a b.png", Command("open", "out/a b.png")),
    ("/model", Command("model", "")),
    ("/model demo [fp16]", Command("model", "demo [fp16]")),
])
def test_parse_new_commands(text, expected):
    assert parse_command(text) == expected


@pytest.mark.parametrize("text", ["!!! wow", "!", "! 12", "!12 a fox", "!12abc", "!-1", "wow!12", "!１２"])
def test_text_starting_with_a_bang_is_a_prompt(text):
    assert parse_command(text) is None


@pytest.mark.parametrize("text, fragment", [
    ("/history 5 6", "/history takes one value"),
    ("/recall", "/recall needs a value"),
    ("/n", "/n needs a value"),
    ("/n 4 5", "/n takes one value"),
])
def test_parse_new_command_errors(text, fragment):
    with pytest.raises(CommandError, match=fragment):
        parse_command(text)


def test_history_and_batch_commands(tmp_path):
    s = session(tmp_path)
    assert s.apply(parse_command("/history")) == Outcome("history", "20")
    assert s.apply(parse_command("/history 5")) == Outcome("history", "5")
    for bad, message in [("/history 0", "history length must be between 1 and"),
                         ("/history x", "history length must be a whole number, got 'x'")]:
        with pytest.raises(CommandError, match=message):
            s.apply(parse_command(bad))
    assert s.batch_count == 1
    assert s.apply(parse_command("/n 4")).action == "message" and s.batch_count == 4
    assert s.apply(parse_command(f"/batch {MAX_BATCH}")).action == "message" and s.batch_count == MAX_BATCH
    for bad, message in [("/n 0", f"batch count must be between 1 and {MAX_BATCH}, got 0"),
                         (f"/n {MAX_BATCH + 1}", f"batch count must be between 1 and {MAX_BATCH}, got {MAX_BATCH + 1}"),
                         ("/n 2.5", "batch count must be a whole number, got '2.5'")]:
        with pytest.raises(CommandError) as info:
            s.apply(parse_command(bad))
        assert str(info.value) == message and s.batch_count == MAX_BATCH


def test_open_and_model_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.png").write_bytes(b"")
    s = session(tmp_path)
    assert s.apply(parse_command("/open")).action == "message"  # nothing saved yet
    assert s.apply(parse_command("/open x.png")) == Outcome("open", "x.png")
    assert s.apply(parse_command("/open ~/x.png")) == Outcome("open", str(tmp_path / "x.png"))
    with pytest.raises(CommandError, match="no image 'y.png'"):
        s.apply(parse_command("/open y.png"))
    s.last_path = "outputs/00000-1.png"
    assert s.apply(parse_command("/open")) == Outcome("open", "outputs/00000-1.png")
    assert s.apply(parse_command("/load ~/x.png")) == Outcome("load", str(tmp_path / "x.png"))
    assert complete("/recall x") == "/recall x.png"
    assert s.apply(parse_command("/model")) == Outcome("model", "")
    assert s.apply(parse_command("/model demo [fp16]")) == Outcome("model", "demo [fp16]")


def test_recall_commands(tmp_path):
    s = session(tmp_path)
    with pytest.raises(CommandError) as info:
        s.apply(parse_command("!1"))
    assert str(info.value) == "no history entry 1 (the history is empty)"
    for i in range(57):
        s.history.append(HistoryEntry(Params(f"p{i}", seed=i), f"out/{i:05d}-{i}.png", "h", "2024-05-01T12:00:00+00:00"))
    assert s.apply(parse_command("!12")) == Outcome("recall", "12")
    assert s.recall_entry("12")[1].params.prompt == "p11"
    assert s.apply(parse_command("/recall 00042-42.png")) == Outcome("recall", "43")
    assert s.apply(parse_command("/recall out/00000-0.png")) == Outcome("recall", "1")
    for bad, message in [("!99", "no history entry 99 (1 ... 57)"), ("!0", "no history entry 0 (1 ... 57)"),
                         ("/recall nope.png", "no history entry for the image 'nope.png'")]:
        with pytest.raises(CommandError) as info:
            s.apply(parse_command(bad))
        assert str(info.value) == message
    assert s.last_prompt is None and not s.recalled  # recalling is the front end's restore()


@pytest.mark.asyncio
async def test_the_prompt_box_completes_every_command(tmp_path):
    """The app's prompt box reads the same registry: a name's first letters, then Right, give the name."""
    from sdterm.service import RenderService
    from sdterm.ui.app import SdtermApp

    from .test_app_snapshots import ScriptedEngine

    s = session(tmp_path)
    app = SdtermApp(RenderService(ScriptedEngine(), tmp_path / "out", s.history), s, image_protocol="halfcell")
    async with app.run_test(size=(100, 30)) as pilot:
        box = app.query_one("#prompt")
        for name, command in COMMANDS.items():
            box.value = ""
            typed = "/" + next(name[:i] for i in range(1, len(name) + 1) if complete("/" + name[:i]).startswith("/" + name))
            await pilot.press(*typed)
            await pilot.pause()
            await pilot.press("right")
            assert box.value == complete(typed), name
