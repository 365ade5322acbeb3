"""LoRAs and VAE files from the outside: ``--lora NAME:W`` (a ``<lora:NAME:W>`` tag at the end of
each render's prompt, as A1111 writes it), ``--lora-dir``/``defaults.lora_dir`` reaching the
engine, and ``sdterm show`` checking an image's LoRAs and VAE against the user's folders. How a
LoRA changes the weights: the engine's own tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sdterm import paths

SMALL = ["--width", "64", "--height", "64", "--steps", "1", "--seed", "3", "--device", "cpu", "--no-history"]


def test_lora_flags_append_tags_to_the_prompt(demo_model, tmp_path, run_cli):
    code, out, err = run_cli("generate", "a fox", "--model", demo_model, "--outdir", tmp_path, "--json", *SMALL,
                             "--lora", "detail:0.8", "--lora", "style")
    assert code == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    assert data["request"]["prompt"] == "a fox <lora:detail:0.8> <lora:style:1>"
    assert isinstance(data["loras"], list)
    with Image.open(data["path"]) as im:
        assert im.text["parameters"].splitlines()[0] == "a fox <lora:detail:0.8> <lora:style:1>"
    assert "detail" in err  # the engine says the LoRA isn't there; the render goes on


def test_lora_flag_on_each_line_of_a_batch(demo_model, tmp_path, run_cli):
    batch = tmp_path / "prompts.txt"
    batch.write_text("a cat\na dog --seed 4\n")
    code, out, err = run_cli("generate", "--from-file", batch, "--model", demo_model, "--outdir", tmp_path / "o",
                             "--json", *SMALL, "--lora", "x:-0.5")
    assert code == 0, err
    prompts = [json.loads(line)["request"]["prompt"] for line in out.strip().splitlines()]
    assert prompts == ["a cat <lora:x:-0.5>", "a dog <lora:x:-0.5>"]


@pytest.mark.parametrize("bad", ["x:abc", ":1", "a<b:1", "x:nan"])
def test_a_bad_lora_flag_is_one_usage_line(run_cli, bad):
    with pytest.raises(SystemExit) as info:
        run_cli("generate", "x", "--lora", bad)
    assert info.value.code == 2


def test_the_lora_folder_reaches_the_engine(demo_model, tmp_path, monkeypatch):
    from sdterm.cli import build_parser
    from sdterm.cli.app import AppModels
    from sdterm.resolve import apply_defaults, user_config

    def folders(*flags):
        args = build_parser().parse_args(["--model", str(demo_model), "--device", "cpu", *flags])
        apply_defaults(args, user_config())
        engine = AppModels(args, str(demo_model), tmp_path / "out", None).load(None, lambda _: None).engine
        return engine.loras.folders.folders, engine.loras.folders.optional

    default = paths.data_dir() / "loras"
    assert folders() == ([default], [default])  # may be missing
    assert folders("--lora-dir", str(tmp_path / "mine")) == ([tmp_path / "mine"], [])  # must exist
    monkeypatch.setenv("HOME", str(tmp_path))
    paths.user_config_file().parent.mkdir(parents=True, exist_ok=True)
    paths.user_config_file().write_text("defaults:\n  lora_dir: ~/set\n")
    assert folders() == ([tmp_path / "set"], [])


# --------------------------------------------------------------------------------------------
# sdterm show: an image's LoRAs and VAE against the user's folders
# --------------------------------------------------------------------------------------------


def addnet_hash(path: Path) -> str:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def write_lora(folder: Path, name: str, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    path = folder / f"{name}.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 4, generator=g)}, str(path),
              metadata={"ss_note": f"seed {seed}"})
    return path


def a1111_png(path: Path, settings: str, prompt: str = "a cat <lora:detail:0.8>") -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
                                f"Model hash: abcdef1234, Model: v1-5-pruned-emaonly, {settings}, Version: v1.10.1")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_show_checks_the_images_loras_and_vae(tmp_path, run_cli):
    lora = write_lora(paths.lora_dir(), "detail")
    short = addnet_hash(lora)
    assert short != hashlib.sha256(lora.read_bytes()).hexdigest()[:12]  # A1111's: the tensors only
    vae_short = "f921fb3f29"
    image = a1111_png(tmp_path / "a.png", f'VAE hash: {vae_short}, VAE: kl-f8-anime2.ckpt, '
                                          f'Lora hashes: "detail: {short}, gone: 0123456789ab"',
                      prompt="a cat <lora:detail:0.8> <lora:gone:1> <lora:untagged:0.5>")
    code, out, err = run_cli("show", image)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "LoRA" in line or "VAE" in line]
    assert notes == [f"note: LoRA gone [0123456789ab]: missing from {paths.lora_dir()}: the image will differ",
                     f"note: LoRA untagged: missing from {paths.lora_dir()}: the image will differ",
                     f"note: VAE kl-f8-anime2.ckpt: missing from {paths.vae_dir()}: put it there, or give --vae PATH"]
    command = out.strip().splitlines()[-1]
    assert command.endswith("--vae kl-f8-anime2.ckpt") and "<lora:detail:0.8>" in command
    assert f"detail [{short}]" in out and f"kl-f8-anime2.ckpt [{vae_short}]" in out

    write_lora(paths.lora_dir(), "gone", seed=1)
    paths.vae_dir().mkdir(parents=True)
    vae = paths.vae_dir() / "kl-f8-anime2.ckpt"
    vae.write_bytes(b"not the same file")
    code, out, err = run_cli("show", image, "--json")
    data = json.loads(out)
    assert data["vae"] == "kl-f8-anime2.ckpt" and data["vae_hash"] == vae_short
    assert data["loras"] == {"detail": short, "gone": "0123456789ab"}
    status = {c["name"]: c["status"] for c in data["lora_files"]}
    assert status == {"detail": "same", "gone": "different", "untagged": "missing"}
    assert any(n.startswith("LoRA gone [0123456789ab]: different file") for n in data["notes"])
    assert any(n.startswith("VAE kl-f8-anime2.ckpt [f921fb3f29]: different file") for n in data["notes"])

    here = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    image = a1111_png(tmp_path / "b.png", f"VAE hash: {here}, VAE: kl-f8-anime2.ckpt", prompt="a cat")
    code, out, err = run_cli("show", image, "--lora-dir", tmp_path / "elsewhere")
    assert code == 0 and "VAE" not in err and "LoRA" not in err


def test_show_reads_sdterms_own_png_with_a_vae(demo_model, tmp_path, run_cli):
    own = tmp_path / "own.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(demo_model / "model.safetensors"))
    save_file({k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")},
              str(own))
    code, out, err = run_cli("generate", "a fox", "--model", demo_model, "--outdir", tmp_path, *SMALL, "--vae", own)
    assert code == 0, err
    code, out, err = run_cli("show", out.strip().splitlines()[-1], "--json")
    data = json.loads(out)
    assert data["source"] == "sdterm" and data["vae"] == "own.safetensors" and len(data["vae_hash"]) == 10
    assert "--vae own.safetensors" in data["command"]
    assert any("VAE own.safetensors: missing from" in n for n in data["notes"])
