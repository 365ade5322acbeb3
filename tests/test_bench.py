"""``sdterm bench``: option parsing, the table and JSON, the budget wiring, and the diffusers reference.

Renders run on the CPU with the tiny demo architecture (64x64, 2 steps, one timed render), with
the reference in "gpu" mode (all on the device, which is the CPU here); the offload modes need
CUDA and are skipped with a note.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdterm.bench.options import (REFERENCE_MODES, BenchOptions, Budget, options_from_args, parse_budgets,
                                  parse_modes, parse_sizes)
from sdterm.bench.reference import MODE_PLANS, reference_modes_to_run
from sdterm.bench.report import format_report
from sdterm.bench.rows import BenchReport, Row, add_ratios
from sdterm.bench.run import bench_sdterm, run_bench
from sdterm.engine.events import StageStats
from sdterm.errors import UserError
from sdterm.units import parse_size

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ("--sizes", "64x64", "--steps", "2", "--repeats", "1", "--budgets", "none", "--device", "cpu")


@pytest.fixture
def tiny_config(tmp_path):
    from omegaconf import OmegaConf

    from sdterm.config import model_config_to_dict
    from sdterm.engine.loading.demo import demo_config, write_tokenizer

    vocab = write_tokenizer(tmp_path / "tok")  # the size of the vocabulary the random source uses
    path = tmp_path / "tiny.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(model_config_to_dict(demo_config(vocab)))))
    return path


@pytest.fixture
def bench_cli(capsys):
    """``sdterm bench ARGS`` in-process through ``sdterm.cli.main`` -> (exit code, stdout, stderr)."""
    from sdterm.cli import main

    def run(*args):
        code = main(["bench", *map(str, args)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def test_parse_sizes():
    assert parse_sizes("512x512,768x512") == ((512, 512), (768, 512))
    assert parse_sizes(" 64X64 , 64x64 ") == ((64, 64),)
    for bad in ("513x512", "512", "512x", "0x512", "axb", "512x512,"):
        with pytest.raises(UserError, match="--sizes"):
            parse_sizes(bad)


def test_parse_budgets():
    got = parse_budgets("1G,1536M,none")
    assert got == (Budget("1G", parse_size("1G")), Budget("1536M", parse_size("1536M")), Budget("none", None))
    assert parse_budgets("1GiB,1024Mi") == (Budget("1GiB", 2**30),)  # duplicates collapse
    for bad in ("1Q", "", "0", "-1G"):
        with pytest.raises(UserError, match="budget"):
            parse_budgets(bad)


def test_parse_modes():
    assert parse_modes("gpu,model-offload") == ("gpu", "model-offload")
    assert parse_modes("compile, group-offload-block,compile") == ("compile", "group-offload-block")
    assert parse_modes("all") == parse_modes(",".join(REFERENCE_MODES)) == REFERENCE_MODES
    assert parse_modes("compile,all") == ("compile", *(m for m in REFERENCE_MODES if m != "compile"))
    assert set(REFERENCE_MODES) == set(MODE_PLANS)  # each mode has its plan text
    for bad in ("gpu,cpu-offload", "group-offload", "compile,", "ALL"):
        with pytest.raises(UserError, match="--reference-modes: unknown mode .*; use gpu, .*compile or all"):
            parse_modes(bad)


def test_offload_and_compile_modes_are_skipped_with_a_note_on_the_cpu():
    notes: list[str] = []
    modes = reference_modes_to_run(BenchOptions(), torch.device("cpu"), notes)
    assert BenchOptions().reference_modes == REFERENCE_MODES and modes == ("gpu",)
    assert notes == [f"diffusers {m} skipped: it needs a CUDA device" for m in REFERENCE_MODES[1:]]


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--sizes", "513x512"), "--sizes"),
        (("--sizes", "512by512"), "--sizes"),
        (("--budgets", "1G,lots"), "--budgets"),
        (("--reference-modes", "tpu"), "--reference-modes"),
        (("--reference-modes", "gpu,compiled"), "unknown mode 'compiled'"),
        (("--steps", "0"), "steps"),
        (("--repeats", "0"), "--repeats"),
    ],
)
def test_bad_options_give_one_line(bench_cli, args, needle):
    code, out, err = bench_cli(*args)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdterm: error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_cuda_asked_for_without_cuda_is_one_line(bench_cli, tiny_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _out, err = bench_cli("--config", tiny_config, "--sizes", "64x64", "--device", "cuda", "--budgets", "none")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "CUDA" in err


# --------------------------------------------------------------------------------------------
# Ratios and the table (no rendering)
# --------------------------------------------------------------------------------------------


def _row(who, label, seconds, size=(512, 512), **kw):
    w, h = size
    mode = label if who == "diffusers" else None
    return Row(who, w, h, label, mode=mode, seconds=list(seconds), step_seconds=[s / 20 for s in seconds], **kw)


def test_ratios_are_against_diffusers_on_gpu_at_the_same_size():
    rows = [
        _row("sdterm", "1G", [3.0, 2.0, 9.0], peak_allocated=900 * 2**20, plan="unet streamed"),
        _row("sdterm", "none", [2.0], size=(768, 512)),
        _row("diffusers", "gpu", [1.0, 2.0]),
        _row("diffusers", "model-offload", [4.5]),
    ]
    add_ratios(rows)
    assert rows[0].seconds_per_render == 3.0  # the median
    assert rows[0].ratio == pytest.approx(2.0)
    assert rows[1].ratio is None  # no diffusers gpu row at 768x512
    assert rows[2].ratio == pytest.approx(1.0)
    assert rows[3].ratio == pytest.approx(3.0)


def test_table_layout():
    rows = [
        _row("sdterm", "1G", [3.0], peak_allocated=900 * 2**20, peak_reserved=950 * 2**20, plan="unet streamed"),
        _row("diffusers", "gpu", [1.5], peak_allocated=3 * 2**30, peak_reserved=3 * 2**30 + 2**29,
             plan="pipe.to(device)"),
        Row("diffusers", 512, 512, "sequential-offload", mode="sequential-offload", error="out of memory: boom"),
    ]
    add_ratios(rows)
    report = BenchReport(card="NVIDIA Test Card", device="cuda", dtype="float16", torch_version="2.x",
                         diffusers_version="0.42", date="2026-01-01T00:00:00+00:00", model="m", demo=False,
                         options=BenchOptions(steps=20, cfg=7.5), rows=rows, notes=["a note"])
    text = format_report(report)
    lines = text.splitlines()
    assert "NVIDIA Test Card" in lines[0] and "torch 2.x" in lines[0] and "2026-01-01" in lines[0]
    assert "20 steps" in lines[1] and "cfg 7.5" in lines[1]
    head = next(i for i, line in enumerate(lines) if line.startswith("size"))
    assert lines[head].split()[:2] == ["size", "run"]
    sd = lines[head + 1]
    assert "sdterm 1G" in sd and "900 MiB" in sd and "950 MiB" in sd and "2.00x" in sd and "unet streamed" in sd
    assert "diffusers gpu" in lines[head + 2] and "1.00x" in lines[head + 2] and "3.00 GiB" in lines[head + 2]
    assert "error: out of memory: boom" in lines[head + 3]
    assert lines[-1] == "note: a note"
    assert "vs compile" not in text  # no torch.compile row: the table keeps its columns
    # the columns line up: "s/render" ends at the same place in every row
    end = lines[head].index("s/render") + len("s/render")
    assert lines[head + 1][:end].endswith("3.000") and lines[head + 2][:end].endswith("1.500")


# --------------------------------------------------------------------------------------------
# Budget wiring, with a stand-in engine
# --------------------------------------------------------------------------------------------


class FakeEngine:
    """Plays the engine's part: records budgets and reports fixed per-stage figures."""

    def __init__(self, with_budget: bool = True):
        self.device = torch.device("cpu")
        self.budgets: list[int | None] = []
        self.renders = 0
        if with_budget:
            self.set_budget = self.budgets.append

    def generate(self, req):
        self.renders += 1
        budget = self.budgets[-1] if self.budgets else None

        def stage(name, alloc, run):
            return StageStats(name, "cuda:0", 0.0, run, alloc + self.renders, alloc * 2, 0, 0, None, None, 0)

        stages = [stage("text", 10, 0.0), stage("unet", 1000, 0.2 * req.steps), stage("vae", 500, 0.1)]
        plan = "unet resident" if budget is None else f"staged within {budget}"
        return SimpleNamespace(seconds=0.5 + self.renders, stages=stages, plan=plan, image=None, notices=[])


def test_each_budget_is_set_before_its_renders():
    engine = FakeEngine()
    opts = BenchOptions(sizes=((64, 64),), budgets=parse_budgets("1G,none"), steps=4, repeats=3)
    rows = bench_sdterm(engine, opts)
    assert engine.budgets == [parse_size("1G"), None]
    assert engine.renders == 2 * (1 + 3)  # a warm-up and three timed renders per budget
    first, second = rows
    assert first.plan == f"staged within {parse_size('1G')}" and second.plan == "unet resident"
    assert first.seconds == [2.5, 3.5, 4.5] and first.seconds_per_render == 3.5
    assert first.seconds_per_step == pytest.approx(0.2)  # U-Net run seconds / steps
    assert first.peak_allocated == 1000 + 4  # max over stages and timed renders
    assert [s.stage for s in first.stages] == ["text", "unet", "vae"]
    assert first.stages[1].peak_reserved == 2000


def test_a_budget_without_engine_support_is_one_line():
    opts = BenchOptions(sizes=((64, 64),), budgets=parse_budgets("1G"), steps=2, repeats=1)
    with pytest.raises(UserError, match="no VRAM budget"):
        bench_sdterm(FakeEngine(with_budget=False), opts)
    rows = bench_sdterm(FakeEngine(with_budget=False), BenchOptions(sizes=((64, 64),), steps=2, repeats=1))
    assert rows[0].seconds and rows[0].error is None  # 'none' works with any engine


# --------------------------------------------------------------------------------------------
# Real runs on the tiny architecture
# --------------------------------------------------------------------------------------------


def test_json_has_sdterm_and_reference_rows(bench_cli, tiny_config):
    code, out, err = bench_cli("--config", tiny_config, *SMALL, "--reference-modes", "gpu", "--json")
    assert code == 0, err
    data = json.loads(out)  # exactly one JSON object on stdout
    assert data["steps"] == 2 and data["cfg"] == 7.5 and data["repeats"] == 1
    assert data["torch"] == torch.__version__ and data["card"] and data["date"] and data["device"] == "cpu"
    rows = {(r["who"], r["label"]): r for r in data["rows"]}
    assert set(rows) == {("sdterm", "none"), ("diffusers", "gpu")}
    ours, ref = rows["sdterm", "none"], rows["diffusers", "gpu"]
    for r in (ours, ref):
        assert r["size"] == "64x64" and r["error"] is None
        assert r["seconds_per_render"] > 0 and r["seconds_per_step"] > 0 and len(r["seconds"]) == 1
    assert ours["budget"] is None and isinstance(ours["plan"], str) and ours["plan"]
    assert [s["stage"] for s in ours["stages"]] == ["text", "unet", "vae"]
    assert ours["stages"][0]["cache"] == "hit"  # the timed render had the prompt cached
    assert ref["mode"] == "gpu" and ref["ratio_to_diffusers_gpu"] == pytest.approx(1.0)
    assert ref["first_render_seconds"] > 0 and ours["first_render_seconds"] is None  # the reference's warm-up
    assert ours["ratio_to_diffusers_compile"] is None and ref["notices"] == []  # no compile row on the CPU
    expected = ours["seconds_per_render"] / ref["seconds_per_render"]
    assert ours["ratio_to_diffusers_gpu"] == pytest.approx(expected, rel=1e-3)


def test_table_from_a_real_run(bench_cli, tiny_config):
    code, out, err = bench_cli("--config", tiny_config, *SMALL, "--no-reference")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("sdterm bench") and f"torch {torch.__version__}" in lines[0]
    assert any(line.startswith("64x64") and "sdterm none" in line for line in lines)
    assert not any("diffusers gpu" in line for line in lines)
    assert "warm-up" in err  # progress goes to stderr


def test_reference_renders_the_same_image_from_the_same_weights(demo_model):
    """diffusers' pipeline on sdterm's weights, seed and settings gives sdterm's image: the harness
    compares like with like."""
    from sdterm.engine.pipeline import open_model

    opts = BenchOptions(sizes=((64, 64), (96, 64)), steps=3, repeats=1, reference_modes=("gpu",))
    report = run_bench(open_model(demo_model), "cpu", opts)
    assert [(r.who, r.size) for r in report.rows] == [
        ("sdterm", "64x64"), ("sdterm", "96x64"), ("diffusers", "64x64"), ("diffusers", "96x64"),
    ]
    for ours, ref in zip(report.rows[:2], report.rows[2:]):
        a, b = np.asarray(ours.image, dtype=np.int16), np.asarray(ref.image, dtype=np.int16)
        assert a.shape == b.shape == (ours.height, ours.width, 3)
        assert a.std() > 5  # a real picture, not a flat or saturated one
        diff = np.abs(a - b)
        assert diff.max() <= 3 and diff.mean() < 0.1, (diff.max(), diff.mean())


# --------------------------------------------------------------------------------------------
# Samplers (issue 13)
# --------------------------------------------------------------------------------------------


def bench_options(*argv: str) -> BenchOptions:
    import argparse

    from sdterm.bench.command import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return options_from_args(parser.parse_args(["bench", *argv]))


@pytest.mark.parametrize(
    "argv, sampler, schedule, calls",
    [
        ((), "DDIM", "Automatic", 20),
        (("--sampler", "DPM++ 2M Karras"), "DPM++ 2M", "Karras", 20),
        (("--sampler", "k_euler_a"), "Euler a", "Automatic", 20),
        (("--sampler", "LMS Karras", "--schedule", "exponential"), "LMS", "Exponential", 20),
        (("--sampler", "Heun"), "Heun", "Automatic", 39),  # two calls a step but the last
        (("--sampler", "DPM++ SDE", "--steps", "10"), "DPM++ SDE", "Automatic", 19),
        (("--sampler", "PLMS"), "PLMS", "Automatic", 21),  # one more on the first step
    ],
)
def test_sampler_options_reach_the_requests(argv, sampler, schedule, calls):
    opts = bench_options(*argv)
    assert (opts.sampler, opts.schedule, opts.model_calls) == (sampler, schedule, calls)
    req = opts.request(64, 64)
    assert (req.sampler, req.schedule) == (sampler, schedule)


def test_an_unknown_sampler_is_one_line(bench_cli, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli("--sampler", "Euler b")
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "" and "Traceback" not in err
    assert err.splitlines()[-1].endswith("argument --sampler: unknown sampler 'Euler b'; one of: DPM++ 2M, DPM++ SDE, "
                                         "DPM++ 2M SDE, DPM++ 2S a, DPM++ 3M SDE, Euler a, Euler, LMS, Heun, DPM2, "
                                         "DPM2 a, DDIM, PLMS, UniPC, LCM")


def test_the_renders_use_the_sampler_and_the_reference_is_skipped_for_another_than_ddim():
    class Recording(FakeEngine):
        def __init__(self):
            super().__init__()
            self.requests = []

        def generate(self, req):
            self.requests.append(req)
            return super().generate(req)

    engine = Recording()
    opts = BenchOptions(sizes=((64, 64),), steps=4, repeats=1, sampler="Heun", schedule="Karras")
    bench_sdterm(engine, opts)
    assert {(r.sampler, r.schedule, r.steps) for r in engine.requests} == {("Heun", "Karras", 4)}
    notes: list[str] = []
    assert reference_modes_to_run(opts, torch.device("cpu"), notes) == ()
    assert notes == ["no diffusers reference rows: they render with DDIM, not Heun"]


def test_the_table_and_json_say_model_calls_per_step():
    def report(**kw):
        return BenchReport(card="c", device="cuda", dtype="float16", torch_version="2.x", diffusers_version=None,
                           date="d", model="m", demo=False, options=BenchOptions(steps=20, **kw))

    assert "20 steps of DDIM, cfg" in format_report(report()).splitlines()[1]
    assert "20 steps of DPM++ 2M Karras, cfg" in format_report(report(sampler="DPM++ 2M")).splitlines()[1]
    heun = format_report(report(sampler="Heun")).splitlines()[1]
    assert "20 steps of Heun (39 model calls: an s/step figure is 1.9 calls)" in heun
    data = report(sampler="Heun").to_dict()
    assert (data["sampler"], data["schedule"], data["model_calls"]) == ("Heun", "Automatic", 39)


def test_a_real_run_with_a_second_order_sampler(bench_cli, tiny_config):
    code, out, err = bench_cli("--config", tiny_config, *SMALL, "--no-reference", "--json", "--sampler", "Heun")
    assert code == 0, err
    data = json.loads(out)
    assert (data["sampler"], data["steps"], data["model_calls"]) == ("Heun", 2, 3)
    assert data["rows"][0]["error"] is None and data["rows"][0]["seconds_per_step"] > 0
