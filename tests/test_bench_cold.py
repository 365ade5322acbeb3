"""``sdterm bench --cold`` (issue 18): fresh ``sdterm generate`` processes on a checkpoint the bench writes."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from sdterm.bench.cold import format_cold, run_cold, write_checkpoint
from sdterm.bench.options import BenchOptions

from .test_bench import bench_cli, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["bench_cli", "tiny_config"]  # fixtures shared with tests/test_bench.py


def test_the_checkpoint_is_single_file_fp32_under_the_original_keys(tiny_config, tmp_path):
    path = write_checkpoint(str(tiny_config), tmp_path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_cold_runs_are_fresh_processes_with_their_own_figures(tiny_config):
    opts = BenchOptions(sizes=((64, 48),), steps=2, prompt="a fox")
    report = run_cold(opts, "cpu", config=str(tiny_config), runs=2)
    assert len(report.runs) == 2 and report.checkpoint_bytes > 0
    for run in report.runs:
        assert run.wall > run.render > 0 and run.startup == pytest.approx(run.wall - run.render)
        assert run.peak_rss is None or run.peak_rss > 50 * 2**20  # a Python process with torch in it
        # The wall time split: the interpreter's start, the command outside its render, the exit.
        assert run.python > 0 and run.exit > 0 and run.before_render > 0  # each part where it belongs
        assert set(run.loads) == {"prepare", "text", "unet", "vae"} and all(v >= 0 for v in run.loads.values())
        assert run.loads["prepare"] + sum(run.loads[s] for s in ("text", "unet", "vae")) < run.render
    assert report.runs[0].loads["text"] > 0  # the first ever builds the text encoder; then its output is cached
    first, second = report.in_process  # a process that rendered twice
    assert first > 0 and second > 0
    split_first, split_second = report.in_process_stages  # each split into its stages
    assert {"prepare", "unet load", "unet run", "vae run"} <= set(split_first) == set(split_second)
    assert split_first["unet load"] > 10 * split_second["unet load"]  # the second finds the U-Net built
    assert sum(split_first.values()) <= first and sum(split_second.values()) <= second
    app = report.app  # a process started as the app is, rendering twice
    assert app.ready > 0 and app.first > 0 and app.second > 0
    assert app.text_encoded  # new prompts, as a user types them: the text encoder ran in both renders
    assert app.peak_rss is None or app.peak_rss > 50 * 2**20
    text = format_cold(report)
    assert "first ever" in text and "again (1)" in text and "64x48" in text and "in one process: first render" in text
    assert "the app: models ready" in text and report.to_dict()["app"]["first"] > 0
    assert "where the wall time went" in text and "unet load" in text and "prepare" in text
    assert "\n  first: prepare " in text and "\n  second: prepare " in text and "unet run" in text
    assert "head start" not in text  # the CPU renders on the command's own thread
    data = report.to_dict()
    assert json.dumps(data) and data["runs"][0]["startup"] == pytest.approx(report.runs[0].startup, abs=1e-3)


def test_a_missing_model_is_one_line(bench_cli, tmp_path):
    code, out, err = bench_cli("--cold", "--model", tmp_path / "nope.safetensors", "--device", "cpu")
    assert code == 1 and out == "" and "--cold times a single-file checkpoint" in err
    assert len(err.strip().splitlines()) == 1


def test_modules_without_cached_bytecode_are_noted(monkeypatch, tmp_path):
    """Where imported modules have no cached bytecode (the GPU machine here sets
    PYTHONDONTWRITEBYTECODE and its torch has none; a PYTHONPYCACHEPREFIX holding torch's alone
    leaves the standard library's out), every process compiles them from source: the figures say
    so, naming some. Modules outside the installation and sdterm (these tests) are not counted."""
    import importlib.machinery
    import importlib.util
    import json.decoder  # noqa: F401 - a standard-library module, imported for sure
    import sys
    import types
    from pathlib import Path

    import sdterm
    from sdterm.bench.cold import ColdReport, bytecode_note, uncached_modules

    missing = str(tmp_path / "none.pyc")
    monkeypatch.setattr(importlib.util, "cache_from_source", lambda path: missing)
    everything = uncached_modules()
    assert {"torch", "json.decoder", "sdterm.bench.cold"} <= set(everything), everything[:20]
    assert not [n for n in everything if n.startswith("tests")], everything  # this file's own: not counted
    note = bytecode_note()
    assert note and "PYTHONPYCACHEPREFIX" in note and f"{len(everything)} modules" in note
    report = ColdReport("x.safetensors", 1, "cpu", 1, (64, 64), notes=[note])
    assert format_cold(report).endswith(note) and report.to_dict()["notes"] == [note]
    # One module of sdterm's without bytecode, every other one with it: that one alone is named.
    origin = str(Path(sdterm.__file__).parent / "probe_without_bytecode.py")
    probe = types.ModuleType("sdterm.probe_without_bytecode")
    probe.__spec__ = importlib.machinery.ModuleSpec(probe.__name__, None, origin=origin)
    monkeypatch.setitem(sys.modules, probe.__name__, probe)
    compiled = tmp_path / "compiled.pyc"
    compiled.write_bytes(b"")
    monkeypatch.setattr(importlib.util, "cache_from_source", lambda path: missing if path == origin else str(compiled))
    assert uncached_modules() == [probe.__name__]
    monkeypatch.setattr(importlib.util, "cache_from_source", lambda path: str(compiled))
    assert uncached_modules() == [] and bytecode_note() is None


def test_on_a_gpu_the_first_render_line_says_the_head_start_is_outside_it():
    from sdterm.bench.cold import ColdReport

    report = ColdReport("x.safetensors", 1, "cuda", 20, (512, 512), in_process=(0.75, 0.21))
    text = format_cold(report)
    assert "first render 0.75 s, second 0.21 s (3.57x)\n  (on a GPU the command's head start" in text
