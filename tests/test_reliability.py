"""Reliability: fuzzed commands and parameters, black-image recovery, long runs."""

from __future__ import annotations

import gc
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdterm.commands import COMMANDS, CommandError, parse_command
from sdterm.errors import ConfigError
from sdterm.history import History
from sdterm.params import Params
from sdterm.session import Session

from .conftest import small_request

COMMAND_WORDS = [*COMMANDS, "sed", ""]


def _session(tmp_path_factory) -> Session:
    folder = tmp_path_factory.mktemp("hist")
    return Session(Params(), History(folder / "history.jsonl"), rng=random.Random(0))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    word=st.sampled_from(COMMAND_WORDS) | st.text(max_size=12),
    arg=st.one_of(
        st.text(max_size=40),
        st.integers(-(2**40), 2**40).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.tuples(st.integers(-5, 5000), st.integers(-5, 5000)).map(lambda t: f"{t[0]}x{t[1]}"),
        st.sampled_from(["", " ", "1G", "0.5G", "auto", "100M", "1e9", "NaN", "inf", "-0", "٣", "５１２x５１２"]),
    ),
    space=st.sampled_from([" ", "  ", "\t", ""]),
)
def test_any_command_line_either_applies_or_gives_one_line(tmp_path_factory, word, arg, space):
    """Whatever is typed after a slash: a valid change (params stay valid) or one clear line,
    params untouched."""
    session = _session(tmp_path_factory)
    before = (session.params, session.seed_locked, session.budget)
    text = f"/{word}{space}{arg}"
    try:
        command = parse_command(text)
        if command is None:
            return
        outcome = session.apply(command)
    except (CommandError, ConfigError) as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        assert (session.params, session.seed_locked, session.budget) == before
        return
    assert outcome.action in ("message", "open", "load", "cache", "help", "quit", "budget", "recall", "history", "model",
                              "vae", "lora", "fork", "verify")
    session.params.replace(prompt="x").validated()


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(-5, 2**33),
    steps=st.integers(-5, 1200),
    cfg=st.floats(allow_nan=True, allow_infinity=True),
    width=st.integers(-8, 5000),
    height=st.integers(-8, 5000),
    eta=st.floats(allow_nan=True, allow_infinity=True),
)
def test_the_validator_accepts_exactly_the_documented_ranges(seed, steps, cfg, width, height, eta):
    req = Params("x", seed=seed, steps=steps, cfg=cfg, width=width, height=height, eta=eta)
    valid = (
        0 <= seed <= 2**32 - 1
        and 1 <= steps <= 1000
        and cfg == cfg and 0 <= cfg <= 50
        and eta == eta and 0 <= eta <= 1
        and all(8 <= side <= 4096 and side % 8 == 0 for side in (width, height))
    )
    try:
        req.validated()
        assert valid
    except ConfigError as exc:
        assert not valid
        assert "\n" not in str(exc)


def test_two_hundred_renders_keep_host_memory_flat(demo_model):
    """200 renders in one process: RSS after the first few stays within 5%."""
    from sdterm.engine.pipeline import Engine, open_model
    from sdterm.engine.memory.meter import host_rss

    engine = Engine(open_model(demo_model), "cpu")
    samples = []
    for i in range(200):
        engine.generate(small_request(seed=i, steps=1, width=32, height=32))
        if i % 20 == 19:
            gc.collect()
            samples.append(host_rss())
    baseline = samples[0]
    assert max(samples) <= baseline * 1.05, [s / 2**20 for s in samples]
