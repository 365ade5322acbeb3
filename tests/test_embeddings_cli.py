"""Textual-inversion embeddings from the outside: where they are found (``--embeddings DIR`` on
``generate`` and the app, ``defaults.embeddings_dir`` in sdterm.yaml, the data folder's
``embeddings``), what ``generate --json`` and the PNG's ``TI hashes`` say about them, the one line
for a file or folder that can't be used, and ``sdterm show`` checking an image's embeddings
against the user's folder. How embeddings change the conditioning: tests/test_textual_inversion.py."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdterm import paths

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "3"]
PROMPT = "a foxy fox"


def write_embedding(folder: Path, name: str = "foxy", seed: int = 0) -> str:
    """A 3-vector embedding for the demo text encoder (32 wide) as A1111's .pt; its short hash."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    path = folder / f"{name}.pt"
    torch.save({"string_to_param": {"*": torch.randn(3, 32, generator=generator)}}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def write_settings(text: str) -> None:
    path = paths.user_config_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def render(run_cli, demo_model, outdir, *extra, prompt=PROMPT):
    """``sdterm generate --json``: (its JSON object, stderr)."""
    code, out, err = run_cli("generate", prompt, "--model", demo_model, "--outdir", outdir, "--json", *SMALL, *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def used(data: dict, role: str = "prompt") -> list[str]:
    return [e["name"] for e in data["prompts"][role]["embeddings"]]


def test_embeddings_flag_changes_the_image_and_is_recorded(demo_model, tmp_path, run_cli):
    folder = tmp_path / "emb"
    short = write_embedding(folder)
    plain, err = render(run_cli, demo_model, tmp_path / "out")
    assert "embedding" not in err
    with_ti, err = render(run_cli, demo_model, tmp_path / "out", "--embeddings", folder)
    assert "embedding" not in err
    with Image.open(plain["path"]) as a, Image.open(with_ti["path"]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b)), "the embedding never reached the text encoder"
        assert "TI hashes" not in a.text["parameters"]
        settings = b.text["parameters"].splitlines()[-1]
        # A1111 quotes a value holding ':' or ','; the extras come after the fixed fields
        assert settings.endswith(f', RNG: CPU, TI hashes: "foxy: {short}"')
        assert json.loads(b.text["sdterm"])["TI hashes"] == f"foxy: {short}"
    assert plain["prompts"]["prompt"]["embeddings"] == [] and plain["infotext_extra"] == {}
    assert with_ti["prompts"]["prompt"]["embeddings"] == [
        {"name": "foxy", "vectors": 3, "hash": short, "file": str(folder / "foxy.pt")}]
    assert with_ti["prompts"]["negative"]["embeddings"] == []
    assert with_ti["infotext_extra"] == {"TI hashes": f"foxy: {short}"}


def test_an_unusable_file_is_named_once_and_the_render_goes_on(demo_model, tmp_path, run_cli):
    folder = tmp_path / "emb"
    short = write_embedding(folder)
    (folder / "bad.pt").write_bytes(b"garbage")
    marker = tmp_path / "gadget-ran"

    class Gadget:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    (folder / "gadget.pt").write_bytes(pickle.dumps({"string_to_param": {"*": Gadget()}}))
    code, out, err = run_cli("generate", PROMPT, "--model", demo_model, "--outdir", tmp_path / "out", "-n", "2",
                             "--embeddings", folder, *SMALL)
    assert code == 0, err
    assert len(out.split()) == 2  # both images of the batch
    lines = [line for line in err.splitlines() if "embedding" in line]
    assert len(lines) == 2, err  # one line per file, once however many renders
    assert sum("bad.pt" in line for line in lines) == 1 and sum("gadget.pt" in line for line in lines) == 1
    assert all(line.startswith("note: embedding not used: ") for line in lines)
    assert not marker.exists()
    for path in out.split():
        with Image.open(path) as im:
            assert f'TI hashes: "foxy: {short}"' in im.text["parameters"]


@pytest.mark.parametrize("how", ["flag", "settings"])
def test_a_folder_the_user_named_must_exist(demo_model, tmp_path, run_cli, how):
    missing = tmp_path / "nope"
    if how == "settings":
        write_settings(f"defaults:\n  embeddings_dir: {missing}\n")
        extra = []
    else:
        extra = ["--embeddings", missing]
    code, out, err = run_cli("generate", PROMPT, "--model", demo_model, "--outdir", tmp_path / "out", "-n", "2",
                             *SMALL, *extra)
    assert code == 0, err
    assert len(out.split()) == 2
    lines = [line for line in err.splitlines() if "embedding" in line]
    assert lines == [f"note: embedding not used: {missing}: no such folder"]


def test_settings_name_the_folder_with_tilde_and_the_flag_wins(demo_model, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    short = write_embedding(tmp_path / "home" / "my-embeddings")
    write_settings("defaults:\n  embeddings_dir: ~/my-embeddings\n")
    data, err = render(run_cli, demo_model, tmp_path / "out")
    assert used(data) == ["foxy"] and data["infotext_extra"] == {"TI hashes": f"foxy: {short}"}
    assert "embedding" not in err
    other = tmp_path / "other"
    other_short = write_embedding(other, seed=1)
    data, err = render(run_cli, demo_model, tmp_path / "out", "--embeddings", other)
    assert data["infotext_extra"] == {"TI hashes": f"foxy: {other_short}"}


def test_the_data_folders_embeddings_are_used_and_their_absence_is_silent(demo_model, tmp_path, run_cli):
    default = paths.data_dir() / "embeddings"
    assert not default.exists()
    code, _, err = run_cli("generate", PROMPT, "--model", demo_model, "--outdir", tmp_path / "out", *SMALL)
    assert code == 0 and "embedding" not in err, err
    short = write_embedding(default)
    data, err = render(run_cli, demo_model, tmp_path / "out")
    assert used(data) == ["foxy"] and data["infotext_extra"] == {"TI hashes": f"foxy: {short}"}
    assert "embedding" not in err


def test_the_apps_flag_reaches_its_engine(demo_model, tmp_path):
    from sdterm.cli import build_parser
    from sdterm.cli.app import AppModels
    from sdterm.resolve import apply_defaults, user_config

    folder = tmp_path / "emb"
    write_embedding(folder)
    args = build_parser().parse_args(["--model", str(demo_model), "--embeddings", str(folder), "--device", "cpu"])
    apply_defaults(args, user_config())
    service = AppModels(args, str(demo_model), tmp_path / "out", None).load(None, lambda _: None)
    assert service.engine.embeddings.folders == [folder] and service.engine.embeddings.optional == []
    args = build_parser().parse_args(["--model", str(demo_model), "--device", "cpu"])
    apply_defaults(args, user_config())
    service = AppModels(args, str(demo_model), tmp_path / "out", None).load(None, lambda _: None)
    default = paths.data_dir() / "embeddings"
    assert service.engine.embeddings.folders == [default] and service.engine.embeddings.optional == [default]


# --------------------------------------------------------------------------------------------
# sdterm show
# --------------------------------------------------------------------------------------------


def a1111_png(path: Path, ti_hashes: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a foxy fox, easynegative\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, "
                                "CFG scale: 7, Seed: 5, Size: 512x512, Model hash: 6ce0161689, Model: v1-5, "
                                f'TI hashes: "{ti_hashes}", Version: v1.10.1')
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def show(run_cli, *args):
    code, out, err = run_cli("show", *args)
    assert code == 0, err
    return out, [line.removeprefix("note: ") for line in err.splitlines()]


def test_show_checks_the_images_embeddings_against_the_folder(tmp_path, run_cli):
    folder = tmp_path / "emb"
    short = write_embedding(folder)
    image = a1111_png(tmp_path / "a.png", f"foxy: {short}, easynegative: c74b4e810b03")
    out, notes = show(run_cli, image, "--embeddings", folder)
    assert f"foxy [{short}], easynegative [c74b4e810b03] (missing)" in out
    assert notes.count(f"embedding easynegative [c74b4e810b03]: missing from {folder}: the image will differ") == 1
    assert not any("foxy" in n for n in notes)
    assert not any("not used by sdterm" in n or "not supported" in n for n in notes)

    different = write_embedding(tmp_path / "other", seed=1)
    out, notes = show(run_cli, image, "--embeddings", tmp_path / "other")
    assert (f"embedding foxy [{short}]: different file (hash {different} here, {tmp_path / 'other' / 'foxy.pt'}): "
            "the image will differ") in notes

    code, out, err = run_cli("show", "--json", image, "--embeddings", folder)
    assert code == 0, err
    data = json.loads(out)
    assert data["embeddings"] == {"foxy": short, "easynegative": "c74b4e810b03"}
    assert "TI hashes" not in data["extra"]
    assert [(e["name"], e["status"]) for e in data["embedding_files"]] == [("foxy", "same"), ("easynegative", "missing")]


def test_show_looks_where_generate_does(tmp_path, run_cli):
    short = write_embedding(paths.data_dir() / "embeddings")
    image = a1111_png(tmp_path / "a.png", f"foxy: {short}")
    _, notes = show(run_cli, image)
    assert not any("embedding" in n for n in notes)
    settings_folder = tmp_path / "configured"
    write_settings(f"defaults:\n  embeddings_dir: {settings_folder}\n")
    _, notes = show(run_cli, image)
    assert f"embedding foxy [{short}]: missing from {settings_folder}: the image will differ" in notes


def test_show_reads_sdtermss_own_png_with_embeddings(demo_model, tmp_path, run_cli):
    folder = tmp_path / "emb"
    short = write_embedding(folder)
    data, _ = render(run_cli, demo_model, tmp_path / "out", "--embeddings", folder)
    out, notes = show(run_cli, data["path"], "--embeddings", folder)
    assert f"embeddings  foxy [{short}]\n" in out and not any("embedding" in n for n in notes)
    out, notes = show(run_cli, data["path"])  # the default folder: none there
    assert any(n.startswith(f"embedding foxy [{short}]: missing from ") for n in notes)


PROBE = """
import contextlib, io, json, sys
from sdterm.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "err": err.getvalue(), "torch": "torch" in sys.modules}))
"""


def test_show_never_imports_torch_even_to_check_embeddings(tmp_path):
    folder = tmp_path / "emb"
    short = write_embedding(folder)
    image = a1111_png(tmp_path / "a.png", f"foxy: {short}, easynegative: c74b4e810b03")
    proc = subprocess.run([sys.executable, "-c", PROBE, "show", str(image), "--embeddings", str(folder)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["code"] == 0 and "easynegative [c74b4e810b03]: missing" in got["err"]
    assert got["torch"] is False
