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
    REQUIRED_TEXT,
    TEXT,
    Command,
    CommandError,
    Outcome,
    complete,
    help_line,
    parse_command,
)
from sdterm.history import History
from sdterm.params import Params
from sdterm.session import Session
from sdterm.ui.screens import help_text

# A valid argument for each kind of command, for the check that each entry parses and runs.
SAMPLE_ARGS = {"seed": "7", "steps": "20", "cfg": "5", "size": "64x48", "neg": "blurry", "eta": "0.5",
               "budget": "1G", "load": "a.png"}


def session(tmp_path) -> Session:
    return Session(Params(), History(tmp_path / "history.jsonl"), random.Random(0))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_is_listed_completed_parsed_and_handled(name, tmp_path):
    command = COMMANDS[name]
    assert command.name == name and command.usage.startswith(f"/{name}") and command.help
    assert command.arg in (NO_ARG, ONE_VALUE, TEXT, REQUIRED_TEXT)
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
    # the handler (through the session)
    outcome = session(tmp_path).apply(Command(name, arg))
    assert isinstance(outcome, Outcome) and outcome.action in ("message", "budget", "open", "load", "cache", "help", "quit")


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
