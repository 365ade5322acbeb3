"""``sdterm bench``'s diffusers modes beyond the first three (issue 18): group offload at block and
leaf level with a CUDA stream, and torch.compile of the U-Net; what each needs, how it is set up,
its rows in the table and the JSON, and its errors.

The CPU has neither CUDA streams nor the CUDA graphs of "reduce-overhead": the setups are checked
against diffusers' own signatures and errors, group offload renders here without its stream, and
torch.compile is stood in for (a compile that fails, one that changes nothing)."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

from sdterm.bench import reference_modes
from sdterm.bench.device import error_line
from sdterm.bench.options import REFERENCE_MODES, BenchOptions
from sdterm.bench.reference import bench_reference, build_pipeline, reference_modes_to_run, reference_weights
from sdterm.bench.report import format_report
from sdterm.bench.rows import BenchReport, Row, add_ratios

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.device("cuda")  # only its type is read: no CUDA is touched
GROUP = ("group-offload-block", "group-offload-leaf")


@pytest.fixture
def all_there(monkeypatch):
    """A CUDA machine with accelerate and triton, as far as ``mode_unavailable`` can tell."""
    import torch.utils._triton

    monkeypatch.setattr(reference_modes, "_has_accelerate", lambda: True)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)


def test_every_mode_runs_where_all_it_needs_is_there(all_there):
    notes: list[str] = []
    assert reference_modes_to_run(BenchOptions(), CUDA, notes) == REFERENCE_MODES and notes == []


def test_compile_without_triton_is_skipped_with_a_note(all_there, monkeypatch):
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    notes: list[str] = []
    assert reference_modes_to_run(BenchOptions(), CUDA, notes) == REFERENCE_MODES[:-1]
    assert notes == ["diffusers compile skipped: torch.compile's inductor needs triton for CUDA (pip install triton)"]


def test_group_offload_without_diffusers_support_is_skipped_with_a_note(all_there, monkeypatch):
    import diffusers

    monkeypatch.delattr(diffusers.DiffusionPipeline, "enable_group_offload")
    notes: list[str] = []
    assert reference_modes_to_run(BenchOptions(), CUDA, notes) == ("gpu", "model-offload", "sequential-offload",
                                                                     "compile")
    why = f"diffusers {diffusers.__version__} has no group offloading of a pipeline"
    assert notes == [f"diffusers {m} skipped: {why}" for m in GROUP]


def test_only_accelerate_modes_need_accelerate(all_there, monkeypatch):
    monkeypatch.setattr(reference_modes, "_has_accelerate", lambda: False)
    notes: list[str] = []
    assert reference_modes_to_run(BenchOptions(), CUDA, notes) == ("gpu", *GROUP, "compile")
    assert notes == [f"diffusers {m} skipped: it needs accelerate (pip install accelerate)"
                     for m in ("model-offload", "sequential-offload")]


@pytest.mark.parametrize("mode, level, blocks", [("group-offload-block", "block_level", 1),
                                                 ("group-offload-leaf", "leaf_level", None)])
def test_group_offload_arguments_are_diffusers_own(mode, level, blocks):
    from diffusers import DiffusionPipeline

    kwargs = reference_modes.group_offload_kwargs(mode, CUDA)
    bound = inspect.signature(DiffusionPipeline.enable_group_offload).bind(None, **kwargs).arguments
    assert bound["onload_device"] == CUDA and bound["offload_device"] == torch.device("cpu")
    assert bound["offload_type"] == level and bound["use_stream"] is True
    assert bound.get("num_blocks_per_group") == blocks


@pytest.mark.parametrize("mode", GROUP)
def test_group_offload_asks_diffusers_for_a_stream(demo_engine, mode):
    """On the CPU diffusers refuses the stream: what the mode asks for reached its check."""
    pipe = build_pipeline(demo_engine, reference_weights(demo_engine), torch.float32)
    with pytest.raises(ValueError, match="streams"):
        reference_modes.place_pipeline(pipe, mode, torch.device("cpu"))


def test_group_offload_rows_without_a_stream_render_the_gpu_rows_image(demo_engine, monkeypatch):
    """The whole pipeline group-offloaded (unet and vae by their own method, the transformers text
    encoder by apply_group_offloading), here without a stream (the CPU has none): the same image."""
    from diffusers import DiffusionPipeline
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    made = reference_modes.group_offload_kwargs
    monkeypatch.setattr(reference_modes, "group_offload_kwargs", lambda m, d: {**made(m, d), "use_stream": False})
    offloaded: list[tuple[str, ...]] = []
    enable = DiffusionPipeline.enable_group_offload

    def recording(pipe, **kwargs):
        enable(pipe, **kwargs)
        offloaded.append(tuple(n for n, c in pipe.components.items()
                               if isinstance(c, torch.nn.Module) and _is_group_offload_enabled(c)))

    monkeypatch.setattr(DiffusionPipeline, "enable_group_offload", recording)
    opts = BenchOptions(sizes=((64, 64),), steps=3, repeats=1)
    rows = bench_reference(demo_engine, opts, ("gpu", *GROUP))
    assert offloaded == [("vae", "text_encoder", "unet")] * 2
    assert [(r.mode, r.plan, r.error) for r in rows] == [
        ("gpu", "pipe.to(device)", None),
        ("group-offload-block", "group offload, block level + stream", None),
        ("group-offload-leaf", "group offload, leaf level + stream", None),
    ]
    gpu = np.asarray(rows[0].image, dtype=np.int16)
    for r in rows[1:]:
        assert r.seconds and r.first_seconds and not r.notices
        assert np.abs(np.asarray(r.image, dtype=np.int16) - gpu).max() <= 1


def _compile_standing_in(monkeypatch, fail: BaseException | None = None) -> list:
    """torch.compile replaced: it records what it was given and returns the module, whose forward
    raises ``fail`` if given (as a compiled module raises when its compile fails)."""
    import torch._dynamo

    calls: list = []

    def compile(model, **kwargs):
        calls.append((model, kwargs))
        if fail is not None:
            def forward(*_a, **_k):
                raise fail
            model.forward = forward
        return model

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    return calls


def test_compile_is_diffusers_recipe_and_notes_its_first_render(demo_engine, monkeypatch):
    calls = _compile_standing_in(monkeypatch)
    rows = bench_reference(demo_engine, BenchOptions(sizes=((64, 64),), steps=3, repeats=1), ("gpu", "compile"))
    (unet, kwargs), reset = calls
    assert kwargs == {"mode": "reduce-overhead", "fullgraph": True} and reset == "reset"  # dynamo let go after
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    gpu, compiled = rows
    assert compiled.error is None and compiled.seconds and compiled.first_seconds > 0
    assert compiled.notices == [f"first render {compiled.first_seconds:.1f} s (compiles)"]
    assert gpu.notices == []
    add_ratios(rows)
    assert compiled.ratio_compiled == pytest.approx(1.0) and gpu.ratio_compiled is not None


def test_a_failed_compile_is_its_rows_error_and_the_run_goes_on(demo_engine, monkeypatch):
    import torch._dynamo.exc

    failure = torch._dynamo.exc.BackendCompilerFailed(
        torch.compile, RuntimeError("Cannot find a working triton installation.\nMore details"), None)
    calls = _compile_standing_in(monkeypatch, failure)
    opts = BenchOptions(sizes=((64, 64), (96, 64)), steps=2, repeats=1)
    rows = bench_reference(demo_engine, opts, ("compile", "gpu"))
    assert calls[-1] == "reset"
    assert [(r.mode, r.error) for r in rows[:2]] == [
        ("compile", "torch.compile failed: RuntimeError: Cannot find a working triton installation.")] * 2
    assert all(r.mode == "gpu" and r.error is None and r.seconds for r in rows[2:])


def test_compile_errors_are_caught_for_the_compile_mode_only():
    import torch._dynamo.exc

    soft = (torch.cuda.OutOfMemoryError,)
    assert reference_modes.mode_errors("gpu", soft) == soft
    import torch._inductor.exc

    caught = reference_modes.mode_errors("compile", soft)
    for exc in (torch.cuda.OutOfMemoryError, torch._dynamo.exc.Unsupported, torch._inductor.exc.InductorError,
                torch._inductor.exc.CUDACompileError):
        assert issubclass(exc, caught), exc
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    assert reference_modes.mode_error_line("compile", oom, error_line) == \
        "out of memory: CUDA out of memory. Tried to allocate 2 GiB"


def test_the_table_and_json_with_compile_and_group_offload_rows():
    def row(who, label, s, **kw):
        return Row(who, 512, 512, label, mode=label if who == "diffusers" else None, seconds=[s],
                   step_seconds=[s / 20], **kw)

    rows = [
        row("sdterm", "none", 0.2, plan="unet resident", notices=["an engine notice"]),
        row("diffusers", "gpu", 0.5, plan="pipe.to(device)", first_seconds=0.9),
        row("diffusers", "group-offload-leaf", 2.0, plan="group offload, leaf level + stream", peak_allocated=2**29),
        Row("diffusers", 512, 512, "group-offload-block", mode="group-offload-block", error="out of memory: boom"),
        row("diffusers", "compile", 0.25, plan="pipe.to(device), torch.compile(unet, reduce-overhead)",
            first_seconds=48.2, notices=["first render 48.2 s (compiles)"]),
    ]
    add_ratios(rows)
    report = BenchReport(card="NVIDIA Test Card", device="cuda", dtype="float16", torch_version="2.x",
                         diffusers_version="0.42", date="d", model="m", demo=False, options=BenchOptions(), rows=rows)
    lines = format_report(report).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("size"))
    assert lines[head].split()[8:] == ["vs", "gpu", "vs", "compile", "plan"]
    sd, gpu, leaf, block, comp = lines[head + 1:head + 6]
    cells = [re.split(r"\s{2,}", line)[6:] for line in (sd, gpu, leaf, block, comp)]  # vs gpu, vs compile, plan
    assert cells == [
        ["0.40x", "0.80x", "unet resident"],  # sdterm's notices have their own lines
        ["1.00x", "2.00x", "pipe.to(device)"],
        ["4.00x", "8.00x", "group offload, leaf level + stream"],
        ["-", "-", "error: out of memory: boom"],
        ["0.50x", "1.00x", "pipe.to(device), torch.compile(unet, reduce-overhead); first render 48.2 s (compiles)"],
    ]
    end = lines[head].index("vs compile") + len("vs compile")  # the new column lines up
    assert [line[:end][-5:] for line in (sd, gpu, leaf, block, comp)] == ["0.80x", "2.00x", "8.00x", "    -", "1.00x"]
    data = report.to_dict()["rows"]
    assert [r["ratio_to_diffusers_compile"] for r in data] == [0.8, 2.0, 8.0, None, 1.0]
    assert [r["first_render_seconds"] for r in data] == [None, 0.9, None, None, 48.2]
    assert data[4]["notices"] == ["first render 48.2 s (compiles)"]
