"""End to end through the CLI on the demo model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SMALL = ["--width", "64", "--height", "64", "--steps", "3"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_json_reports_path_seed_and_stages(demo_model, tmp_path, run_cli):
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--json", "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    data = json.loads(out)
    assert Path(data["path"]) == tmp_path / "00000-1.png"
    assert Path(data["path"]).is_file()
    assert data["seed"] == 1 and data["seconds"] > 0 and data["demo"] is True
    assert [s["stage"] for s in data["stages"]] == ["text", "unet", "vae"]
    for s in data["stages"]:
        for key in ("load_seconds", "run_seconds", "peak_allocated", "peak_reserved", "resident_start",
                    "resident_end", "device_free", "device_total", "host_rss"):
            assert key in s
        assert s["host_rss"] > 0  # CPU-only: host memory is what is reported
    assert any("noise" in n for n in data["notices"])
    assert Image.open(data["path"]).size == (64, 64)


def test_same_seed_same_pixels_other_seed_differs(demo_model, tmp_path, run_cli):
    paths = []
    for seed in (7, 7, 8):
        code, out, err = run_cli("generate", "a castle", "--model", demo_model, "--seed", seed, "--outdir", tmp_path, *SMALL)
        assert code == 0, err
        paths.append(Path(out.strip()))
    assert [p.name for p in paths] == ["00000-7.png", "00001-7.png", "00002-8.png"]  # never overwritten
    a, b, c = (pixels(p) for p in paths)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_png_carries_a1111_parameters_and_request(demo_model, tmp_path, run_cli):
    code, out, err = run_cli(
        "generate", "a red fox", "--model", demo_model, "--seed", 42, "--negative", "blurry", "--cfg", 5,
        "--outdir", tmp_path, *SMALL,
    )
    assert code == 0, err
    img = Image.open(out.strip())
    lines = img.text["parameters"].split("\n")
    assert lines[0] == "a red fox"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: DDIM, CFG scale: 5, Seed: 42, Size: 64x64, Model hash: ")
    assert lines[2].endswith(", Model: demo")
    meta = json.loads(img.text["sdterm"])
    assert meta["request"]["negative"] == "blurry" and meta["request"]["seed"] == 42


def test_random_seed_is_printed_and_used(demo_model, tmp_path, run_cli):
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 0
    seed = int(err.split("seed ", 1)[1].split()[0])
    assert Path(out.strip()).name.endswith(f"-{seed}.png")


def test_bad_parameters_get_one_line(demo_model, tmp_path, run_cli):
    for args, needle in (
        (["--width", "100"], "multiple of 8"),
        (["--steps", "0"], "steps must be between 1 and 1000"),
        (["--seed", str(2**32)], "seed must be between"),
        (["--eta", "2"], "eta must be between"),
    ):
        code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *args)
        assert code != 0
        assert needle in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))


def test_missing_model_is_one_line(tmp_path, run_cli):
    code, out, err = run_cli("generate", "x", "--model", tmp_path / "nope.safetensors")
    assert code == 1
    assert "no such file" in err and len(err.strip().splitlines()) == 1


def test_unwritable_outdir_keeps_the_image(demo_model, tmp_path, run_cli, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--seed", 3, "--outdir", blocker / "sub", *SMALL)
    assert code == 1
    assert "cannot write" in err and "kept as" in err
    kept = Path(err.split("kept as ", 1)[1].strip())
    assert kept.is_file() and Image.open(kept).size == (64, 64)


def test_random_weights_with_a_config(tmp_path, run_cli):
    """--random-weights builds the modules from the config with random weights (full size by default)."""
    from omegaconf import OmegaConf

    from sdterm.config import model_config_to_dict
    from sdterm.engine.loading.demo import demo_config

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(OmegaConf.to_yaml(OmegaConf.create(model_config_to_dict(demo_config(634)))))
    code, out, err = run_cli("generate", "x", "--random-weights", "--config", cfg, "--seed", 1, "--json",
                             "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    data = json.loads(out)
    assert data["demo"] is True and Path(data["path"]).is_file()


def test_console_entry_point_subprocess(demo_model, tmp_path):
    """The real process: `python -m sdterm generate ... --json` prints exactly one JSON object."""
    proc = subprocess.run(
        [sys.executable, "-m", "sdterm", "generate", "a red fox", "--model", str(demo_model), "--seed", "1",
         "--json", "--outdir", str(tmp_path), *SMALL],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert Path(data["path"]).is_file()
    assert "Traceback" not in proc.stderr
