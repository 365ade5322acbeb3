"""``sdterm bench --init S`` and ``--hires X`` (issue 16): their options, rows and references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdterm.bench.img2img import bench_img2img_reference, diffusers_steps, write_init_image
from sdterm.bench.options import BenchOptions
from sdterm.bench.run import run_bench

from .test_bench import SMALL, bench_cli, bench_options, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["bench_cli", "tiny_config"]  # fixtures shared with tests/test_bench.py


def test_options_reach_the_requests(tmp_path):
    opts = bench_options("--hires", "2x", "--hires-steps", "5", "--hires-strength", "0.5", "--hires-upscaler",
                         "latent (bicubic)")
    req = opts.request(512, 768)
    assert opts.kind == "hires" and req.hires_scale == 2.0 and req.hires_steps == 5 and req.hires_strength == 0.5
    assert req.hires_upscaler == "Latent (bicubic)" and not req.init_image
    opts = bench_options("--init", "0.6")
    req = opts.request(64, 64, str(write_init_image(tmp_path, 64, 64)))
    assert opts.kind == "img2img" and req.strength == 0.6 and req.init_image.endswith("init-64x64.png")
    assert not req.hires and bench_options().kind == "txt2img" and not bench_options().request(64, 64, "x").init_image


@pytest.mark.parametrize("args, needle", [
    (("--init", "0.6", "--hires", "2"), "--init and --hires"),
    (("--hires-steps", "5"), "go with --hires"),
    (("--hires", "9"), "hires scale"),
    (("--hires", "2", "--hires-upscaler", "ESRGAN"), "unknown upscaler"),
    (("--init", "1.5"), "strength"),
])
def test_bad_img2img_options_give_one_line(bench_cli, capsys, args, needle):
    try:
        code, out, err = bench_cli(*args)
    except SystemExit as exc:  # argparse's own error (exit 2), for a flag's type
        code, (out, err) = exc.code, capsys.readouterr()
    assert code in (1, 2) and out == ""
    lines = err.strip().splitlines()
    assert lines[-1].startswith("sdterm") and needle in lines[-1], err
    assert "Traceback" not in err


def test_diffusers_steps_make_the_updates_asked_for():
    for updates in range(1, 40):
        for strength in (0.3, 0.5, 0.7, 0.75, 0.999, 1.0):
            n = diffusers_steps(updates, strength)
            assert int(n * strength) == updates and int((n - 1) * strength) < updates, (updates, strength, n)


@pytest.mark.parametrize("kind", [{"init_strength": 0.5}, {"hires_scale": 2.0}])
def test_other_modes_than_gpu_are_skipped_with_a_note(tmp_path, kind):
    """Offload and torch.compile are measured for text-to-image only: here a note, no rows, no crash."""
    opts = BenchOptions(sizes=((64, 64),), **kind)
    notes: list[str] = []
    modes = ("compile", "group-offload-block", "group-offload-leaf")
    assert bench_img2img_reference(None, opts, modes, print, tmp_path, notes) == []
    assert notes == [f"{opts.kind} reference: diffusers all on the device only "
                     "(compile, group-offload-block, group-offload-leaf not measured)"]


def test_hires_rows_from_a_real_run(demo_model):
    from sdterm.engine.pipeline import open_model

    opts = BenchOptions(sizes=((64, 64), (64, 96)), steps=3, repeats=1, reference_modes=("gpu",), hires_scale=2.0,
                        hires_steps=3)
    report = run_bench(open_model(demo_model), "cpu", opts)
    assert [(r.who, r.size) for r in report.rows] == [
        ("sdterm", "64x64->128x128"), ("sdterm", "64x96->128x192"),
        ("diffusers", "64x64->128x128"), ("diffusers", "64x96->128x192"),
    ]
    for row in report.rows:
        assert row.error is None and row.image.size == row.target and row.ratio is not None
    assert [s.stage for s in report.rows[0].stages] == ["text", "unet", "hires", "vae"]
    data = report.to_dict()
    assert data["kind"] == "hires" and data["hires"]["scale"] == 2.0 and data["rows"][0]["target"] == [128, 128]
    json.dumps(data)


def test_init_rows_render_from_the_init_image(demo_model):
    from sdterm.engine.pipeline import open_model

    source = open_model(demo_model)
    plain = run_bench(source, "cpu", BenchOptions(sizes=((64, 64),), steps=4, repeats=1, reference_modes=()))
    opts = BenchOptions(sizes=((64, 64),), steps=4, repeats=1, reference_modes=("gpu",), init_strength=0.5)
    report = run_bench(source, "cpu", opts)
    ours, ref = report.rows
    assert (ours.who, ref.who) == ("sdterm", "diffusers") and ours.target is None and ref.error is None
    a, b = np.asarray(ours.image, dtype=np.int16), np.asarray(plain.rows[0].image, dtype=np.int16)
    assert np.abs(a - b).mean() > 5  # from the init image, not from noise
    assert "denoising strength 0.5" in "\n".join(report.notes + [__import__("sdterm.bench.report", fromlist=["x"])
                                                               .format_report(report)])


def test_the_table_says_what_the_rows_render(bench_cli, tiny_config):
    code, out, err = bench_cli("--config", tiny_config, *SMALL, "--no-reference", "--hires", "1.5")
    assert code == 0, err
    assert "hires fix: x1.5 (Latent), 2 more steps at strength 0.7" in out
    assert any(line.startswith("64x64->96x96") for line in out.splitlines())


def test_preview_rows_are_timed_beside_the_plain_ones(demo_model):
    from sdterm.engine.events import Preview
    from sdterm.engine.pipeline import Engine, open_model
    from sdterm.bench.run import bench_sdterm

    engine = Engine(open_model(demo_model), "cpu")
    calls = []
    real = engine.generate

    def spy(req, **kw):
        frames = []
        result = real(req, emit=lambda e: isinstance(e, Preview) and frames.append(e), **kw)
        calls.append((kw.get("preview"), len(frames)))
        return result

    engine.generate = spy
    rows = bench_sdterm(engine, BenchOptions(sizes=((64, 64),), steps=3, repeats=2, preview=True))
    assert [(r.label, r.error) for r in rows] == [("none", None), ("none +preview", None)]
    # warm-ups, then plain and previewed renders alternate; a previewed render sends a frame a step
    assert calls == [(None, 0), (0.0, 3), (None, 0), (0.0, 3), (None, 0), (0.0, 3)]
    assert all(len(r.seconds) == 2 for r in rows)
