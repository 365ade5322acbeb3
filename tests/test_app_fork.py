"""/fork K in the app (issue 17), through Pilot on the demo model (tests/test_app.py's helpers)."""

from __future__ import annotations

import json

import pytest
import torch

from sdterm.history import history_file
from tests import test_app
from tests.test_app import SIZE, enter, make_app, notice, render, settle

engine, real_engine = test_app.engine, test_app.real_engine  # the fixtures
pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("one_thread")]


async def test_fork_renders_the_rest_with_the_new_prompt_and_the_history_says_so(engine, tmp_path):
    app = make_app(engine, tmp_path, seed=7, seed_locked=True, steps=4, sampler="DDIM")
    async with app.run_test(size=SIZE) as pilot:
        await render(pilot, "a red fox")
        parent = app.last_result
        parent_path = app.session.last_path
        assert len(parent.trail) == 4 and engine.options[-1]["trail"] is True
        await enter(pilot, "/fork 0")  # nothing changed: the same render from the start
        await settle(pilot)
        assert engine.options[-1].get("fork") is None
        assert torch.equal(app.last_result.latents, parent.latents)
        parent, parent_path = app.last_result, app.session.last_path  # the image shown is the parent now
        await enter(pilot, "/cfg 3")
        await enter(pilot, "/seed 99")  # the fork keeps the parent's seed: its latent holds that noise
        await enter(pilot, "/fork 2")
        await settle(pilot)
        req, fork = engine.requests[-1], engine.options[-1]["fork"]
        assert (req.prompt, req.cfg, req.seed) == ("a red fox", 3.0, 7)
        assert fork.at.step == 2 and fork.parent == parent.request
        assert not torch.equal(app.last_result.latents, parent.latents)
        lines = [json.loads(line) for line in history_file().read_text().splitlines()]
        assert lines[-1]["fork"] == {"parent": parent_path, "step": 2} and "fork" not in lines[0]


async def test_fork_without_a_render_or_out_of_range_is_one_line(engine, tmp_path):
    app = make_app(engine, tmp_path, steps=3)
    async with app.run_test(size=SIZE) as pilot:
        await enter(pilot, "/fork 1")
        await pilot.pause()
        assert "nothing to fork yet" in notice(app) and engine.requests == []
        await render(pilot, "a fox")
        await enter(pilot, "/fork 3")
        await pilot.pause()
        assert "K from 0 to 2" in notice(app) and len(engine.requests) == 1
        await enter(pilot, "/fork x")
        await pilot.pause()
        assert "K is a step number" in notice(app)
        await enter(pilot, "/sampler Euler")
        await enter(pilot, "/fork 1")
        await pilot.pause()
        assert "from DDIM only to DDIM" in notice(app) and len(engine.requests) == 1
