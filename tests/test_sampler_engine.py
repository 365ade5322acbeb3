"""Every sampler through the whole engine on the demo model: the model calls it makes are the ones
the planner and the U-Net streamer were told (``SamplerInfo.calls``), a deterministic sampler gives
the same image twice, and an out-of-memory retry in the middle of the U-Net stage resumes a
multistep or ancestral sampler exactly where it was (its history and its noise included). The
samplers' numbers against k-diffusion and diffusers are tests/test_k_samplers.py and
tests/test_samplers_diffusers.py."""

from __future__ import annotations

import pytest
import torch

from sdterm.engine.events import Notice, StepDone
from sdterm.engine.memory.planner import GiB, Plan
from sdterm.engine.pipeline import Engine, open_model
from sdterm.samplers import SAMPLER_LIST, SAMPLERS

from .conftest import oom_on_call, small_request

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
STAGED = Plan(GiB, prefetch_unet=True, prefetch_vae=True)


@pytest.fixture(scope="module")
def engine(demo_model):
    return Engine(open_model(demo_model), "cpu", plan=STAGED)


def counted_unet(engine):
    """Count the U-Net's forward passes (a batch of cond+uncond is one pass)."""
    unet = engine.models.module("unet")
    calls = {"n": 0}
    real = unet.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    unet.forward = forward  # an instance attribute over the class's method

    def restore() -> None:
        del unet.forward

    return calls, restore


@pytest.mark.parametrize("name", [s.name for s in SAMPLER_LIST])
def test_each_sampler_renders_with_the_planned_model_calls(engine, name):
    calls, restore = counted_unet(engine)
    steps = []
    try:
        result = engine.generate(small_request(sampler=name, steps=STEPS),
                                 emit=lambda e: isinstance(e, StepDone) and steps.append(e.step))
    finally:
        restore()
    assert result.image.size == (64, 64)
    assert steps == list(range(1, STEPS + 1))
    assert calls["n"] == SAMPLERS[name].calls(STEPS), "the streamer would prefetch the wrong number of passes"
    assert torch.isfinite(result.latents).all()


@pytest.mark.parametrize("name", [s.name for s in SAMPLER_LIST if s.deterministic] + ["Euler a", "DPM++ 2M SDE"])
def test_a_sampler_gives_the_same_image_for_the_same_request(engine, name):
    a = engine.generate(small_request(sampler=name, steps=STEPS, seed=9))
    b = engine.generate(small_request(sampler=name, steps=STEPS, seed=9))
    assert torch.equal(a.latents, b.latents)


def test_samplers_and_schedules_change_the_latents(engine):
    base = engine.generate(small_request(sampler="Euler", steps=STEPS)).latents
    other = engine.generate(small_request(sampler="DPM++ 2M", steps=STEPS)).latents
    karras = engine.generate(small_request(sampler="Euler", schedule="Karras", steps=STEPS)).latents
    assert not torch.equal(base, other) and not torch.equal(base, karras)


@pytest.mark.parametrize("name", ["DPM++ 2M", "Euler a", "LMS", "PLMS", "UniPC", "DPM++ 2M SDE", "Heun"])
def test_an_out_of_memory_retry_mid_render_resumes_the_sampler_exactly(demo_model, name):
    request = small_request(sampler=name, steps=5, seed=3)
    baseline = Engine(open_model(demo_model), "cpu", plan=STAGED).generate(request)
    engine = Engine(open_model(demo_model), "cpu", plan=STAGED)
    unet = engine.models.module("unet")
    fail_at = 4
    flaky = oom_on_call(unet.forward, fail_at)  # in the middle of the U-Net stage
    made = {"n": 0}

    def forward(*args, **kwargs):
        made["n"] += 1
        return flaky(*args, **kwargs)

    unet.forward = forward
    notices: list[str] = []
    result = engine.generate(request, emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any("retrying" in n for n in notices), notices
    assert torch.equal(result.latents, baseline.latents)
    # Resumed at the failed step, not from the start: the calls of the steps completed before the
    # failure are not made again (a deterministic sampler started over would give the same latents).
    info = SAMPLERS[name]
    done, completed = fail_at - 1, 0
    while info.calls(request.steps) - info.calls(request.steps, completed + 1) <= done:
        completed += 1
    redone = done - (info.calls(request.steps) - info.calls(request.steps, completed))
    assert made["n"] == info.calls(request.steps) + redone + 1


@pytest.mark.parametrize("name, schedule, steps", [("Euler", "DDIM", 7), ("Heun", "KL Optimal", 3), ("DPM2", "DDIM", 6)])
def test_schedules_that_change_the_step_count_are_planned_and_shown_as_they_run(engine, name, schedule, steps):
    """A1111's "DDIM" schedule strides 1000 // steps (7 asked, 8 made); KL Optimal ends above 0 (a
    second-order sampler calls twice on its last step too): the progress bar and the streamer's
    pass count follow what the sampler really does."""
    from sdterm.engine.sampling.schedules import sampler_plan

    total, planned = sampler_plan(SAMPLERS[name], schedule, steps)
    calls, restore = counted_unet(engine)
    events = []
    try:
        engine.generate(small_request(sampler=name, schedule=schedule, steps=steps),
                        emit=lambda e: isinstance(e, StepDone) and events.append(e))
    finally:
        restore()
    assert [e.step for e in events] == list(range(1, total + 1)) and {e.total for e in events} == {total}
    assert calls["n"] == planned
    assert (total, planned) != (steps, SAMPLERS[name].calls(steps))  # these cases do differ
