"""The thread a one-shot ``sdterm generate`` renders on (engine/render_thread.py), the engine's
head start on it (``Engine.warm_for``: the U-Net's read prefetched, the attention's plans, the
resident models uploaded and called once) and
``Models.prefetch``. On a GPU the render after a head start is checked against a plain one
(tests/test_cuda_model_cache.py)."""

from __future__ import annotations

import argparse
import threading
import time

import pytest
import torch

from sdterm.engine import unet_stage
from sdterm.engine.render_thread import RenderThread
from sdterm.service import RenderService

from .conftest import small_request


def test_jobs_run_in_order_on_one_thread_and_call_returns_or_raises():
    thread = RenderThread()
    seen: list[tuple[str, str]] = []
    thread.submit(lambda: (time.sleep(0.05), seen.append(("a", threading.current_thread().name))))
    assert thread.call(lambda: seen.append(("b", threading.current_thread().name)) or 7) == 7
    assert seen == [("a", "sdterm-render"), ("b", "sdterm-render")]
    with pytest.raises(ZeroDivisionError):
        thread.call(lambda: 1 / 0)


def test_a_submitted_job_that_failed_is_raised_by_the_next_call_once():
    thread = RenderThread()
    thread.submit(lambda: {}["missing"])
    with pytest.raises(KeyError):
        thread.call(lambda: "rendered")
    assert thread.call(lambda: "rendered") == "rendered"  # reported once, not again


def test_a_job_cannot_wait_for_its_own_thread():
    thread = RenderThread()
    with pytest.raises(RuntimeError, match="own thread"):
        thread.call(lambda: thread.call(lambda: None))


def test_the_service_renders_on_its_thread():
    class Engine:
        def generate(self, params, **kwargs):
            return threading.current_thread().name

    assert RenderService(Engine(), ".").render(small_request()) == threading.current_thread().name
    assert RenderService(Engine(), ".", thread=RenderThread()).render(small_request()) == "sdterm-render"


class _Models:
    """Stand-in for ``Models``: the factories count their calls; the U-Net's can be held back."""

    def __init__(self, fail: bool = False):
        self.calls: list[str] = []
        self.release = threading.Event()
        self.fail = fail

    def build(self) -> str:
        self.calls.append(threading.current_thread().name)
        self.release.wait(5)
        if self.fail:
            self.fail = False  # the next build works
            raise OSError("read failed")
        return "unet model"


def _models_with(stub: _Models, demo_model):
    from sdterm.engine.loading.models import Models, open_model

    models = Models(open_model(demo_model), torch.float32)
    models.factories["unet"] = stub.build
    return models


def test_module_waits_for_the_prefetch_and_builds_once(demo_model):
    stub = _Models()
    models = _models_with(stub, demo_model)
    models.prefetch("unet")
    models.prefetch("unet")  # already being built
    assert not models.built("unet")
    threading.Timer(0.05, stub.release.set).start()
    assert models.module("unet") == "unet model"
    assert models.built("unet")
    assert stub.calls == ["sdterm-prefetch"]
    models.prefetch("unet")  # built: nothing more
    assert stub.calls == ["sdterm-prefetch"]


def test_a_failed_prefetch_is_raised_by_module_and_the_next_use_builds_again(demo_model):
    stub = _Models(fail=True)
    stub.release.set()
    models = _models_with(stub, demo_model)
    models.prefetch("unet")
    with pytest.raises(OSError, match="read failed"):
        models.module("unet")
    assert models.module("unet") == "unet model"
    assert stub.calls == ["sdterm-prefetch", threading.current_thread().name]


@pytest.fixture
def warm_calls(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(unet_stage, "warm_attention",
                        lambda cfg, calls_, h, w, dtype, device: calls.append((calls_, h, w, dtype, device.type)))
    return calls


def test_warm_for_does_nothing_on_the_cpu(demo_engine, warm_calls, monkeypatch):
    prefetched: list[str] = []
    monkeypatch.setattr(demo_engine.models, "prefetch", prefetched.append)
    demo_engine.warm_for(small_request())
    assert warm_calls == [] and prefetched == []


def _warming_engine(demo_model, monkeypatch, from_cache: bool, plan, fail: str | None = None):
    """An engine whose ``warm_for`` records what it does instead of doing it on a GPU: ``plan``
    is what it plans (a Plan, or an exception to raise), ``fail`` a step that runs out of memory."""
    from sdterm.engine.pipeline import Engine, open_model

    engine = Engine(open_model(demo_model), "cpu")
    engine.device = torch.device("cuda")  # only its type is read before the calls (replaced here)
    done: list = []

    def step(name, result=None):
        def record(*args, **kwargs):
            done.append((name, *args))
            if name == fail:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
            return result
        return record

    def planned(req, **kwargs):
        done.append(("plan", req.width, req.height))
        if isinstance(plan, Exception):
            raise plan
        return plan

    monkeypatch.setattr(engine.models, "prefetch", step("prefetch"))
    monkeypatch.setattr(engine.models, "from_cache", lambda stage: from_cache)
    engine.sized_on = sized_on = []  # the threads the plan's model sizes were asked on

    def sizes():
        sized_on.append(threading.current_thread().name)
        if fail == "sizes":
            raise RuntimeError("sizes failed (test)")
    monkeypatch.setattr(engine.models, "sizes", sizes)
    monkeypatch.setattr(engine, "plan", planned)
    monkeypatch.setattr(engine, "_acquire", lambda stage, mode: step("acquire")(stage, mode) or f"{stage} model")
    monkeypatch.setattr(engine.placement, "offload", step("offload"))
    monkeypatch.setattr(engine, "_end_graphs", lambda plan_, failed: done.append(("end graphs", plan_.unet, failed)))
    monkeypatch.setattr(unet_stage, "warm_attention",
                        lambda cfg, calls, h, w, dtype, device: done.append(("attention", calls, h, w, dtype)))
    monkeypatch.setattr(engine, "_graphed", lambda unet, plan_, ring: lambda x, t, context: step("unet call")(
        unet, x.shape, x.dtype, t.shape, t.dtype, context.shape, context.dtype))
    real_inputs = unet_stage.warm_inputs  # the real ones, made on the CPU
    monkeypatch.setattr(unet_stage, "warm_inputs", lambda *args: real_inputs(*args[:-1], torch.device("cpu")))
    monkeypatch.setattr(unet_stage, "warm_vae", lambda vae, latent, tile: step("warm vae")(vae, tuple(latent.shape), tile))
    monkeypatch.setattr(unet_stage.torch.cuda, "empty_cache", lambda: done.append("emptied"))
    return engine, done


def test_warm_for_reads_uploads_and_calls_the_resident_models_after_the_attention_plans(demo_model, monkeypatch):
    """Read from the model cache into a resident plan: the read starts, the attention's plans are
    built meanwhile, then the plan is made, the U-Net uploaded and called twice through the
    graphs at the render's signature (the warm-up, then the capture), the VAE decoder uploaded
    and called on zeros, and torch's cache emptied (the render plans from the free memory next)."""
    from sdterm.engine.memory.planner import Plan

    plan = Plan(None, text="resident", unet="resident", vae="resident", vae_tile=None)
    engine, done = _warming_engine(demo_model, monkeypatch, True, plan)
    engine.warm_for(small_request(width=96, height=64, cfg=7.5))
    text = (2, 77, engine.models.cfg.unet.context_dim)
    assert done == [
        ("prefetch", "unet"),
        ("prefetch", "vae"),
        ("attention", [(2, 77)], 8, 12, engine.dtype),
        ("plan", 96, 64),
        ("acquire", "unet", "resident"),
        *[("unet call", "unet model", (2, 4, 8, 12), torch.float32, (2,), torch.float32, text, engine.dtype)] * 2,
        ("end graphs", "resident", False),  # kept where their pool fits beside the render (as after one)
        ("acquire", "vae", "resident"),
        ("warm vae", "vae model", (1, 4, 8, 12), None),
        "emptied",
    ], done
    monkeypatch.setattr(engine.models, "built", lambda stage: True)
    done.clear()
    engine.warm_for(small_request())  # the U-Net is built: its first calls were made by its first render
    assert done == []


@pytest.mark.parametrize("from_cache, plan, planned", [
    (True, "staged", True),  # the U-Net goes back to the host after its stage: not uploaded ahead
    (True, "streamed", True),
    (True, "too small", True),  # the budget cannot take the render: the render says so
    (False, "resident", False),  # converted in the render, which warms on stand-ins meanwhile
])
def test_warm_for_builds_the_attention_plans_alone_where_the_unet_is_not_read_into_residence(
        demo_model, monkeypatch, from_cache, plan, planned):
    from sdterm.engine.memory.planner import BudgetTooSmall, Plan

    made = BudgetTooSmall("too small") if plan == "too small" else Plan(None, text="staged", unet=plan, vae="resident")
    engine, done = _warming_engine(demo_model, monkeypatch, from_cache, made)
    engine.warm_for(small_request(width=64, height=64, cfg=1.0))
    want = [("prefetch", "unet"), ("prefetch", "vae")] if from_cache else []
    want += [("attention", [(1, 77)], 8, 8, engine.dtype)] + ([("plan", 64, 64)] if planned else []) + ["emptied"]
    assert done == want


def test_warm_for_follows_the_engines_forced_plan(demo_model, monkeypatch):
    from sdterm.engine.memory.planner import Plan

    engine, done = _warming_engine(demo_model, monkeypatch, True, Plan(None, unet="resident", vae="resident"))
    engine.forced_plan = Plan(None, unet="staged", vae="staged")  # what every render of this engine runs
    engine.warm_for(small_request(width=64, height=64))
    assert done == [("prefetch", "unet"), ("prefetch", "vae"), ("attention", [(2, 77)], 8, 8, engine.dtype), "emptied"]


def _sizes_done() -> None:
    for t in [t for t in threading.enumerate() if t.name == "sdterm-sizes"]:
        t.join()


@pytest.mark.parametrize("from_cache", [True, False])
def test_warm_for_asks_for_the_plans_model_sizes_on_a_thread_beside_the_attention_plans(
        demo_model, monkeypatch, from_cache):
    """Read from the model cache: the planner's model sizes (meta-device models, 0.1 s) are made
    on a thread of their own while this thread builds the attention's plans (its plan then
    finds them made); a conversion has no plan made here, so none."""
    from sdterm.engine.memory.planner import Plan

    engine, done = _warming_engine(demo_model, monkeypatch, from_cache, Plan(None, unet="staged", vae="staged"))
    engine.warm_for(small_request(width=64, height=64))
    _sizes_done()
    assert engine.sized_on == (["sdterm-sizes"] if from_cache else [])


def test_warm_for_goes_on_when_the_sizes_thread_fails(demo_model, monkeypatch):
    """Its error is the render's to report (the plan asks for the sizes again), not a traceback."""
    from sdterm.engine.memory.planner import Plan

    hooked: list = []
    monkeypatch.setattr(threading, "excepthook", hooked.append)
    engine, done = _warming_engine(demo_model, monkeypatch, True, Plan(None, unet="staged", vae="staged"), "sizes")
    engine.warm_for(small_request(width=64, height=64))
    _sizes_done()
    assert engine.sized_on == ["sdterm-sizes"] and hooked == []
    assert done[-1] == "emptied"


@pytest.mark.parametrize("fail", ["acquire", "unet call", "warm vae"])
def test_warm_for_out_of_memory_offloads_what_it_uploaded_and_leaves_the_render_to_plan(demo_model, monkeypatch, fail):
    from sdterm.engine.memory.planner import Plan

    engine, done = _warming_engine(demo_model, monkeypatch, True, Plan(None, unet="resident", vae="resident"), fail)
    cleared = []
    monkeypatch.setattr(engine.unet_graphs, "clear", lambda: cleared.append(True))
    engine.warm_for(small_request(width=64, height=64))  # no error: only a head start
    assert done[-3:] == [("offload", "unet"), ("offload", "vae"), "emptied"], done
    assert cleared  # the graphs' pool goes with them


def test_generate_renders_on_a_warmed_thread_only_on_a_gpu(monkeypatch):
    from sdterm.cli import generate

    class Engine:
        def __init__(self, device: str):
            self.device = torch.device(device)
            self.warmed: list = []

        def warm_for(self, params):
            self.warmed.append((params.width, params.height, threading.current_thread().name))

    args = argparse.Namespace(prompt="a red fox", seed=3, width=320, height=192, lora=None)
    monkeypatch.setattr(generate, "_params_from", lambda job: small_request(width=job.width, height=job.height))
    assert generate.render_thread(Engine("cpu"), [("", args)]) is None
    gpu = Engine("cuda")
    thread = generate.render_thread(gpu, [("line 1", "a bad line"), ("", args)])
    assert thread.call(lambda: "after the head start") == "after the head start"
    assert gpu.warmed == [(320, 192, "sdterm-render")]


def test_an_interrupt_while_waiting_for_a_render_goes_on_at_once():
    """Ctrl+C during ``generate``'s render reaches the waiting main thread (the command then exits
    as interrupted; the render, on a daemon thread, ends with the process)."""
    import signal

    thread = RenderThread()
    hold = threading.Event()
    main = threading.main_thread().ident

    def render():
        signal.pthread_kill(main, signal.SIGINT)  # Ctrl+C, as the terminal's reaches the main thread
        hold.wait(10)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        thread.call(render)
    assert time.monotonic() - started < 5  # not after the render's end
    hold.set()


def test_generate_hands_its_renders_to_the_render_thread(demo_model, tmp_path, run_cli, monkeypatch):
    """The command's renders run on the thread ``render_thread`` gives (on the CPU it gives none:
    forced here), each after the jobs queued before it."""
    from sdterm.cli import generate
    from sdterm.engine.pipeline import Engine

    seen: list[str] = []
    real = Engine.generate

    def recorded(self, *args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", recorded)
    monkeypatch.setattr(generate, "render_thread", lambda engine, jobs: RenderThread())
    code, _, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--steps", 1, "--width", 64,
                           "--height", 64, "--outdir", tmp_path, "--no-history", "--device", "cpu", "-n", 2)
    assert code == 0, err
    assert seen == ["sdterm-render", "sdterm-render"]
    assert len(list(tmp_path.glob("*.png"))) == 2  # saved by the command's own thread, as before
