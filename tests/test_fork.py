"""Forking a render from a step (issue 17): the trail a render keeps and the render resumed from it."""

from __future__ import annotations

import pytest
import torch

from sdterm.engine.fork import Fork
from sdterm.engine.pipeline import Engine, open_model
from sdterm.errors import ConfigError

from .conftest import small_request
from .test_img2img import UNetSpy

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have")]


@pytest.fixture(scope="module")
def engine(demo_model):
    return Engine(open_model(demo_model), "cpu")


def render(engine, req, **kw):
    with UNetSpy(engine) as spy:
        result = engine.generate(req, **kw)
    return result, spy.calls


@pytest.mark.parametrize("sampler", ["DDIM", "PLMS", "UniPC", "DPM++ 2M", "Euler a", "DPM++ SDE", "LCM"])
def test_a_fork_with_nothing_changed_reproduces_the_parent_calling_the_unet_only_for_the_rest(engine, sampler):
    req = small_request(steps=6, sampler=sampler, negative="blurry", eta=0.0)
    parent, parent_calls = render(engine, req, trail=True)
    assert [s.step for s in parent.trail] == list(range(1, len(parent.trail) + 1))
    assert all(s.carry["x"].device.type == "cpu" for s in parent.trail)
    for k in (1, 3, len(parent.trail) - 1):
        child, calls = render(engine, req, fork=Fork(req, parent.trail[k - 1]))
        assert torch.equal(child.latents, parent.latents), (sampler, k)
        assert len(calls) == len(parent_calls) - parent.trail[k - 1].calls, (sampler, k)
        assert torch.equal(calls[0][0], parent_calls[parent.trail[k - 1].calls][0])  # resumes from the kept latent


def test_a_fork_at_step_k_of_ddim_makes_steps_minus_k_calls_with_the_new_prompt(engine):
    req = small_request(steps=8, sampler="DDIM", negative="blurry")
    parent, parent_calls = render(engine, req, trail=True)
    new = req.replace(prompt="a blue whale", cfg=3.0)
    child, calls = render(engine, new, fork=Fork(req, parent.trail[4]))  # after 5 steps
    assert len(calls) == 8 - 5
    assert torch.equal(calls[0][0], parent_calls[5][0])  # the parent's latent after step 5
    fresh, fresh_calls = render(engine, new)
    assert all(torch.equal(c[2], fresh_calls[0][2]) for c in calls)  # the new prompt's conditioning
    assert not torch.equal(child.latents, parent.latents) and not torch.equal(child.latents, fresh.latents)


def test_a_fork_into_another_k_diffusion_sampler_takes_the_latent(engine):
    req = small_request(steps=6, sampler="DPM++ 2M", schedule="Karras")
    parent, parent_calls = render(engine, req, trail=True)
    euler = req.replace(sampler="Euler")
    child, calls = render(engine, euler, fork=Fork(req, parent.trail[2]))
    assert len(calls) == 3 and torch.equal(calls[0][0], parent_calls[3][0])
    assert not torch.equal(child.latents, parent.latents)


@pytest.mark.parametrize("change, needle", [
    ({"seed": 2}, "seed must be the parent's"),
    ({"width": 72}, "width"),
    ({"steps": 7}, "steps"),
    ({"schedule": "Karras"}, "schedule"),
    ({"sampler": "Euler"}, "from DDIM only to DDIM"),
])
def test_a_fork_that_cannot_resume_is_one_line(engine, change, needle):
    req = small_request(steps=4, sampler="DDIM")
    parent = engine.generate(req, trail=True)
    with pytest.raises(ConfigError) as info:
        engine.generate(req.replace(**change), fork=Fork(req, parent.trail[1]))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_no_trail_unless_asked(engine):
    assert engine.generate(small_request(steps=2)).trail is None


def test_the_history_line_records_a_fork_and_reads_it_back():
    from sdterm.history import HistoryEntry
    from sdterm.params import Params

    entry = HistoryEntry.now(Params(prompt="a fox"), "/x/child.png", "abc", {"parent": "/x/parent.png", "step": 3})
    back = HistoryEntry.from_json(entry.to_json())
    assert back.fork == {"parent": "/x/parent.png", "step": 3} and back.params == entry.params
    plain = HistoryEntry.now(Params(prompt="a fox"), None, "abc")
    assert "fork" not in plain.to_json() and HistoryEntry.from_json(plain.to_json()).fork is None
    for bad in ('"fork": 3', '"fork": {"step": "3"}', '"fork": {"step": true}', '"fork": {"parent": 1, "step": 2}'):
        line = plain.to_json()[:-1] + ", " + bad + "}"
        with pytest.raises(ValueError, match="fork"):
            HistoryEntry.from_json(line)
