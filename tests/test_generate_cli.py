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


def test_demo_flag_renders_the_demo_model_with_generate(demo_model, tmp_path, run_cli):
    """``sdterm --demo generate PROMPT`` renders the demo model (written to the data folder on
    first use), the same pixels as ``--model`` on it; with --model too, one clear line."""
    code, out, err = run_cli("--demo", "generate", "a red fox", "--seed", 1, "--json", "--outdir", tmp_path / "a", *SMALL)
    assert code == 0, err
    data = json.loads(out)
    assert data["demo"] is True and Path(data["path"]).is_file()
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--json",
                             "--outdir", tmp_path / "b", *SMALL)
    assert code == 0, err
    assert np.array_equal(pixels(data["path"]), pixels(json.loads(out)["path"]))
    code, out, err = run_cli("--demo", "generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 1 and err.strip().splitlines() == [
        "sdterm: error: --demo renders the demo model: leave out --model and --random-weights"], err


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
    assert lines[2].endswith(", Model: demo, RNG: CPU")  # A1111 writes RNG unless it is its default (GPU)
    meta = json.loads(img.text["sdterm"])
    assert meta["request"]["negative"] == "blurry" and meta["request"]["seed"] == 42
    assert (meta["request"]["sampler"], meta["request"]["schedule"], meta["request"]["rng"]) == ("DDIM", "Automatic", "cpu")


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


def _meta(path) -> dict:
    return json.loads(Image.open(path).text["sdterm"])["request"]


def test_batch_count_renders_seed_then_seed_plus_one(demo_model, tmp_path, run_cli):
    """-n 3: three PNGs, seeds S, S+1, S+2 in their metadata, three history lines (A1111's batch count)."""
    from sdterm.history import history_file

    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "-S", 41, "-n", 3, "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    paths = out.split()
    assert len(paths) == 3 and len(set(paths)) == 3
    assert [_meta(p)["seed"] for p in paths] == [41, 42, 43]
    assert [p.endswith(f"-{s}.png") for p, s in zip(paths, (41, 42, 43))] == [True] * 3
    lines = [json.loads(line) for line in history_file().read_text().splitlines()]
    assert [(e["seed"], e["path"]) for e in lines] == [(s, p) for s, p in zip((41, 42, 43), paths)]
    # The same seeds give the same pixels as one render each.
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "-S", 42, "--outdir", tmp_path, *SMALL)
    assert (pixels(out.strip()) == pixels(paths[1])).all()


def test_batch_count_with_a_random_seed_and_json(demo_model, tmp_path, run_cli):
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--batch-count", 2, "--json", "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    first, second = (json.loads(line) for line in out.splitlines())
    assert second["seed"] == (first["seed"] + 1) % 2**32


def test_batch_count_applies_to_each_line_of_a_file(demo_model, tmp_path, run_cli):
    batch = tmp_path / "prompts.txt"
    batch.write_text("a cat --seed 5\na dog --seed 9\n")
    code, out, err = run_cli("generate", "--from-file", batch, "--model", demo_model, "-n", 2, "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    got = [(_meta(p)["prompt"], _meta(p)["seed"]) for p in out.split()]
    assert got == [("a cat", 5), ("a cat", 6), ("a dog", 9), ("a dog", 10)]


def test_batch_count_out_of_range_is_one_line(tmp_path, run_cli):
    for n in (0, 65):
        code, out, err = run_cli("generate", "x", "-n", n, "--outdir", tmp_path)
        assert code != 0 and out == "" and err.count("\n") == 1 and "--batch-count" in err


def test_no_history_flag_and_setting_leave_the_history_alone(demo_model, tmp_path, run_cli):
    from sdterm import paths
    from sdterm.history import history_file

    args = ["generate", "x", "--model", demo_model, "-S", 1, "--outdir", tmp_path, *SMALL]
    assert run_cli(*args)[0] == 0
    before = history_file().read_bytes()
    assert len(before.splitlines()) == 1
    code, out, err = run_cli(*args, "--no-history")
    assert code == 0 and Path(out.strip()).is_file(), err
    assert history_file().read_bytes() == before
    paths.user_config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.user_config_file().write_text("defaults:\n  history: false\n")
    assert run_cli(*args)[0] == 0
    assert history_file().read_bytes() == before
    assert run_cli(*args, "--history")[0] == 0  # the flag wins over the setting
    assert len(history_file().read_bytes().splitlines()) == 2


def test_history_setting_must_be_true_or_false(tmp_path, run_cli):
    from sdterm import paths

    paths.user_config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.user_config_file().write_text("defaults:\n  history: maybe\n")
    code, out, err = run_cli("generate", "x", "--outdir", tmp_path)
    assert code != 0 and "defaults.history" in err and err.count("\n") == 1


def test_a_torn_history_line_is_moved_aside_and_said_once(demo_model, tmp_path, run_cli):
    from sdterm.history import history_file

    history_file().parent.mkdir(parents=True, exist_ok=True)
    history_file().write_text('{"prompt": "torn by a cra', encoding="utf-8")
    args = ["generate", "x", "--model", demo_model, "-S", 1, "--outdir", tmp_path, *SMALL]
    code, out, err = run_cli(*args)
    assert code == 0 and "moved 1 unreadable line(s) to" in err and "history.jsonl.bad" in err
    code, out, err = run_cli(*args)
    assert code == 0 and "unreadable" not in err
    assert len(history_file().read_text(encoding="utf-8").splitlines()) == 2


# ---- samplers (issue 13) -----------------------------------------------------------------------


def test_sampler_flags_reach_the_png_and_the_history(demo_model, tmp_path, run_cli):
    from sdterm.history import history_file

    code, out, err = run_cli("generate", "a fox", "--model", demo_model, "--seed", 3, "--sampler", "lms karras",
                             "--rng", "CPU", "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    img = Image.open(out.strip())
    assert img.text["parameters"].split("\n")[-1].startswith("Steps: 3, Sampler: LMS, Schedule type: Karras, CFG scale")
    request = json.loads(img.text["sdterm"])["request"]
    assert (request["sampler"], request["schedule"], request["rng"]) == ("LMS", "Karras", "cpu")
    line = json.loads(history_file().read_text().splitlines()[-1])
    assert (line["sampler"], line["schedule"], line["rng"]) == ("LMS", "Karras", "cpu")


def test_a_batch_line_may_name_its_own_sampler(demo_model, tmp_path, run_cli):
    batch = tmp_path / "prompts.txt"
    batch.write_text('a cat --seed 5\na dog --seed 9 --sampler "DPM++ 2M Karras" --eta-ancestral 0.5\n')
    code, out, err = run_cli("generate", "--from-file", batch, "--model", demo_model, "--sampler", "Euler",
                             "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    got = [(_meta(p)["prompt"], _meta(p)["sampler"], _meta(p)["schedule"]) for p in out.split()]
    assert got == [("a cat", "Euler", "Automatic"), ("a dog", "DPM++ 2M", "Karras")]


def test_bad_sampler_names_are_one_line_listing_the_names(demo_model, tmp_path, run_cli, capsys):
    import pytest

    for flag, value, names in (("--sampler", "Euler b", "DPM++ 2M, DPM++ SDE, DPM++ 2M SDE, "),
                               ("--schedule", "Fast", "Automatic, Uniform, Karras, Exponential, "),
                               ("--rng", "mps", "cpu, nv, gpu")):
        with pytest.raises(SystemExit) as exc:
            run_cli("generate", "x", flag, value, "--outdir", tmp_path)
        out, err = capsys.readouterr()
        assert exc.value.code == 2 and out == ""
        assert f"error: argument {flag}: unknown {flag[2:]} {value!r}; one of: {names}" in err.splitlines()[-1]
    # a batch line's bad name is that line's one error; the other lines still render
    batch = tmp_path / "prompts.txt"
    batch.write_text("a cat --sampler nope\na dog\n")
    code, out, err = run_cli("generate", "--from-file", batch, "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 1 and "unknown sampler 'nope'; one of: DPM++ 2M" in err and len(out.split()) == 1
