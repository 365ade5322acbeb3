"""Finding the model and the settings: flags, sdterm.yaml, the models folder, the demo, batches."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sdterm import paths
from sdterm.errors import ConfigError
from sdterm.resolve import demo_model_dir, find_models, resolve_model, user_config
from sdterm.settings import load_user_config

SMALL = ["--width", "64", "--height", "64", "--steps", "2"]


def write_settings(text: str) -> Path:
    path = paths.user_config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_model_from_flag_settings_or_the_only_model(demo_model, tmp_path):
    cfg = user_config()
    assert resolve_model("x.ckpt", cfg) == "x.ckpt"
    with pytest.raises(ConfigError, match="sdterm download"):
        resolve_model(None, cfg)
    models = paths.data_dir() / "models"
    models.mkdir(parents=True)
    shutil.copytree(demo_model, models / "demo")
    assert find_models() == [models / "demo"]
    assert resolve_model(None, cfg) == str(models / "demo")
    (models / "other.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="2 models .*pick one with --model"):
        resolve_model(None, cfg)
    write_settings(f"defaults:\n  model: {models / 'demo'}\n")
    assert resolve_model(None, user_config()) == str(models / "demo")


def test_settings_are_validated_by_the_one_validator():
    path = write_settings("defaults:\n  steps: 0\n")
    with pytest.raises(ConfigError, match="steps must be between 1 and 1000") as info:
        load_user_config(path)
    assert str(path) in str(info.value)
    write_settings("defaults:\n  width: 500\n")
    with pytest.raises(ConfigError, match="multiple of 8"):
        user_config()
    write_settings("defaults:\n  image_protocol: jpeg\n")
    with pytest.raises(ConfigError, match="image_protocol"):
        user_config()
    write_settings("defaults:\n  colour: red\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        user_config()


def test_embeddings_folder_from_flag_settings_or_the_data_folder(monkeypatch, tmp_path):
    from sdterm.resolve import embedding_folders

    default = paths.data_dir() / "embeddings"
    assert embedding_folders(None) == ([default], [default])  # may be missing: optional
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedding_folders("~/emb") == ([tmp_path / "emb"], [])  # named: must exist
    write_settings("defaults:\n  embeddings_dir: ~/mine\n")
    assert user_config().defaults.embeddings_dir == "~/mine"
    for bad, needle in (("embeddings_dir: 3", "expected text"), ('embeddings_dir: "a\\0b"', "NUL")):
        write_settings(f"defaults:\n  {bad}\n")
        with pytest.raises(ConfigError, match=needle):
            user_config()


def test_lora_folder_and_vae_from_flag_settings_or_the_data_folder(monkeypatch, tmp_path):
    import argparse

    from sdterm.resolve import apply_defaults, lora_folders, resolve_vae

    default = paths.data_dir() / "loras"
    assert lora_folders(None) == ([default], [default]) and paths.lora_dir() == default
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lora_folders("~/loras") == ([tmp_path / "loras"], [])  # named: must exist
    write_settings("defaults:\n  lora_dir: ~/mine\n  vae: vae-ft-mse\n")
    args = argparse.Namespace(lora_dir=None, vae=None)
    apply_defaults(args, user_config())
    assert (args.lora_dir, args.vae) == ("~/mine", "vae-ft-mse")
    args = argparse.Namespace(lora_dir="flag", vae="flag.pt")
    apply_defaults(args, user_config())
    assert (args.lora_dir, args.vae) == ("flag", "flag.pt")  # the flag wins
    assert resolve_vae(None) is None and resolve_vae("") is None
    assert resolve_vae("~/v.pt") == tmp_path / "v.pt" and resolve_vae("sub/v.pt") == Path("sub/v.pt")
    folder = paths.vae_dir()
    assert resolve_vae("vae-ft-mse") == folder / "vae-ft-mse"  # not there yet: the engine says so
    folder.mkdir(parents=True)
    (folder / "vae-ft-mse.safetensors").write_bytes(b"x")
    assert resolve_vae("vae-ft-mse") == resolve_vae("vae-ft-mse.safetensors") == folder / "vae-ft-mse.safetensors"
    for bad, needle in (("lora_dir: 3", "expected text"), ('vae: "a\\0b"', "NUL")):
        write_settings(f"defaults:\n  {bad}\n")
        with pytest.raises(ConfigError, match=needle):
            user_config()


def test_draft_settings_are_validated_like_the_command_line():
    assert user_config().draft == load_user_config(Path("/nonexistent")).draft
    d = user_config().draft
    assert (d.sampler, d.steps, d.cfg, d.lora) == ("LCM", 4, 1.5, "")
    write_settings("draft:\n  sampler: k_lcm\n  steps: 8\n  cfg: 2\n  lora: lcm-lora-sdv1-5\n")
    d = user_config().draft
    assert (d.sampler, d.steps, d.cfg, d.lora) == ("LCM", 8, 2.0, "lcm-lora-sdv1-5")  # A1111's alias read
    for bad, needle in (("sampler: Turbo", "draft.sampler: unknown sampler 'Turbo'"),
                        ("steps: 0", "draft: steps must be between 1 and 1000"),
                        ("cfg: 99", "draft: cfg"), ("lora: ../x", "draft.lora"), ("speed: 2", "unknown setting")):
        path = write_settings(f"draft:\n  {bad}\n")
        with pytest.raises(ConfigError, match=needle) as info:
            user_config()
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_generate_uses_settings_and_the_models_folder(demo_model, tmp_path, run_cli):
    models = paths.data_dir() / "models"
    models.mkdir(parents=True)
    shutil.copytree(demo_model, models / "demo")
    write_settings(f"defaults:\n  steps: 2\n  width: 64\n  height: 48\n  outdir: {tmp_path / 'imgs'}\n")
    code, out, err = run_cli("generate", "a fox", "--seed", 3, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["request"]["steps"] == 2 and data["request"]["height"] == 48
    assert Path(data["path"]).parent == tmp_path / "imgs"
    # A flag still wins over the settings.
    code, out, err = run_cli("generate", "a fox", "--seed", 3, "--json", "--steps", "3")
    assert json.loads(out)["request"]["steps"] == 3


def test_from_file_renders_each_line_with_its_own_flags(demo_model, tmp_path, run_cli):
    batch = tmp_path / "prompts.txt"
    batch.write_text(
        "# a comment\n"
        "a red fox --seed 5\n"
        "\n"
        '"a castle, at night" --seed 6 --steps 3 --negative blurry\n'
        "a bad line --width 70\n"
        "a lake --seed 7\n"
    )
    code, out, err = run_cli("generate", "--from-file", batch, "--model", demo_model, "--outdir", tmp_path / "o",
                             "--json", *SMALL)
    assert code == 1  # one line failed; the others rendered
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["seed"] for r in rows] == [5, 6, 7]
    assert rows[1]["request"]["prompt"] == "a castle, at night"
    assert rows[1]["request"]["steps"] == 3 and rows[1]["request"]["negative"] == "blurry"
    assert rows[0]["request"]["steps"] == 2
    assert f"{batch}:5: width must be a multiple of 8" in err
    assert "Traceback" not in err


def test_generate_needs_a_prompt_or_a_file(demo_model, run_cli):
    code, out, err = run_cli("generate", "--model", demo_model)
    assert code == 1 and "PROMPT or --from-file" in err


def test_demo_model_is_written_once_to_the_data_dir():
    first = demo_model_dir()
    assert (first / "model.safetensors").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo_model_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_flag_opens_the_app_on_the_demo_model(monkeypatch, run_cli):
    """`sdterm --demo` builds the engine on the demo model and starts the app with small defaults."""
    seen = {}

    class FakeApp:
        internal_errors: list = []
        print_tracebacks = False
        error_log = None
        return_code = 0

        def __init__(self, service, session, *, load, model_names, image_protocol, debug=False):
            # The app loads the model itself, once its screen is up: do what its worker does.
            assert service is None
            steps = []
            loaded = load(None, steps.append)
            seen.update(engine=loaded.engine, session=session, protocol=image_protocol, debug=debug, steps=steps)

        def run(self):
            seen["ran"] = True

    import sdterm.ui.app as app_module
    import sdterm.ui.terminal as terminal

    monkeypatch.setattr(app_module, "SdtermApp", FakeApp)
    import sdterm.cli.app as cli_app

    monkeypatch.setattr(terminal, "prepare_graphics", lambda protocol="auto": protocol)
    monkeypatch.setattr(cli_app, "require_terminal", lambda: None)  # pytest's capture: stdout is no TTY
    code, out, err = run_cli("--demo", "--device", "cpu")
    assert code == 0, err
    assert seen["ran"] and seen["engine"].source.demo
    assert seen["steps"][-1] == "setting up the engine"  # what the loading line showed
    assert (seen["session"].params.width, seen["session"].params.steps) == (256, 20)
    assert seen["protocol"] == "auto" and seen["debug"] is False
    assert os.fspath(seen["engine"].source.checkpoint).startswith(os.fspath(paths.data_dir()))


def test_from_file_unknown_flag_is_reported_with_its_line(demo_model, tmp_path, run_cli):
    """An unknown flag on one line (issue 12): FILE:LINE and a one-line reason; the others render."""
    batch = tmp_path / "prompts.txt"
    batch.write_text("a red fox --seed 5\na cat --bogus-flag 3\na lake --seed 7\n")
    code, out, err = run_cli("generate", "--from-file", batch, "--model", demo_model, "--outdir", tmp_path / "o",
                             "--json", *SMALL)
    assert code == 1
    assert [json.loads(line)["seed"] for line in out.splitlines()] == [5, 7]
    bad = [line for line in err.splitlines() if f"{batch}:2:" in line]
    assert len(bad) == 1 and "--bogus-flag" in bad[0]
    assert "Traceback" not in err and "usage:" not in err


def test_no_cuda_graphs_flag_and_setting_reach_the_engine(demo_model, tmp_path, monkeypatch):
    """``--no-cuda-graphs`` (or ``defaults.cuda_graphs: false``) turns the engine's graphs off;
    neither given: on."""
    from sdterm.cli import build_parser
    from sdterm.cli.engine_setup import make_engine
    from sdterm.engine.pipeline import open_model
    from sdterm.resolve import apply_defaults
    from sdterm.settings import Defaults, UserConfig

    monkeypatch.setenv("SDTERM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SDTERM_DATA_DIR", str(tmp_path / "data"))
    for argv, setting, want in ((["a fox"], True, True), (["a fox", "--no-cuda-graphs"], True, False),
                                (["a fox"], False, False)):
        args = build_parser().parse_args(["generate", *argv, "--model", str(demo_model), "--device", "cpu"])
        apply_defaults(args, UserConfig(defaults=Defaults(cuda_graphs=setting)))
        assert make_engine(open_model(demo_model), args).cuda_graphs is want, (argv, setting)
