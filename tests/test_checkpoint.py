"""Safe checkpoint reading: hostile pickles, damaged files, other architectures, the model hash."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdterm.engine.loading.checkpoint import CheckpointError, open_checkpoint
from sdterm.engine.loading.file_hash import remembered_sha256
from sdterm.engine.pipeline import Engine, open_model

from .conftest import small_request


class _Gadget:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecGadget:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _hostile_ckpts(tmp_path: Path):
    marker = tmp_path / "PWNED"
    yield "os.system in a torch.save zip", marker, lambda p: torch.save({"state_dict": {"a": _Gadget(marker)}}, p)
    yield "builtins.exec", marker, lambda p: torch.save({"x": _ExecGadget(marker)}, p)
    yield "nested gadget in a list", marker, lambda p: torch.save(
        {"state_dict": {"w": torch.zeros(2)}, "callbacks": [{"deep": (_Gadget(marker),)}]}, p
    )
    yield "legacy (non-zip) pickle", marker, lambda p: p.write_bytes(pickle.dumps({"a": _Gadget(marker)}, protocol=2))


def test_pickles_that_would_run_code_are_refused_and_never_run(tmp_path):
    for label, marker, write in _hostile_ckpts(tmp_path):
        path = tmp_path / f"{label.replace(' ', '_')}.ckpt"
        write(path)
        with pytest.raises(CheckpointError) as info:
            open_checkpoint(path)
        msg = str(info.value)
        assert "refused" in msg, (label, msg)
        assert "\n" not in msg
        assert not marker.exists(), f"{label}: the pickle's code ran"


def test_hostile_ckpt_through_cli_is_one_line(tmp_path, run_cli):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": _Gadget(marker)}}, path)
    code, out, err = run_cli("generate", "x", "--model", path, "--outdir", tmp_path)
    assert code == 1 and "refused" in err and "system" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not marker.exists()


def test_ckpt_in_original_layout_loads_like_safetensors(demo_model, tmp_path):
    """A torch.save .ckpt ({'state_dict': ..., 'global_step': ...}) with extra EMA/encoder keys."""
    from safetensors.torch import load_file

    sd = load_file(demo_model / "model.safetensors")
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    folder = tmp_path / "ck"
    folder.mkdir()
    torch.save({"state_dict": sd, "global_step": 470000}, folder / "model.ckpt")
    (folder / "config.yaml").write_bytes((demo_model / "config.yaml").read_bytes())
    (folder / "tokenizer").symlink_to(demo_model / "tokenizer")
    ckpt = Engine(open_model(folder), "cpu")
    a = ckpt.generate(small_request())
    b = Engine(open_model(demo_model), "cpu").generate(small_request())
    assert a.image.tobytes() == b.image.tobytes()
    assert ckpt.models.encoder_id == f"sha256:{ckpt.models.sha256}"  # no text digest of a pickle: the file's


def test_text_keys_without_text_model_level_load(demo_model, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(demo_model / "model.safetensors")
    old = "cond_stage_model.transformer.text_model."
    sd = {(k.replace(old, "cond_stage_model.transformer.") if k.startswith(old) else k): v for k, v in sd.items()}
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    (folder / "config.yaml").write_bytes((demo_model / "config.yaml").read_bytes())
    (folder / "tokenizer").symlink_to(demo_model / "tokenizer")
    ckpt = Engine(open_model(folder), "cpu")
    a = ckpt.generate(small_request())
    b = Engine(open_model(demo_model), "cpu").generate(small_request())
    assert a.image.tobytes() == b.image.tobytes()
    assert ckpt.models.encoder_id.startswith("text-sha256:")  # the text tensors found under the shorter prefix


def _variant(demo_model: Path, tmp_path: Path, name: str, edit) -> Path:
    from safetensors.torch import load_file

    sd = load_file(demo_model / "model.safetensors")
    sd = edit(sd)
    folder = tmp_path / name
    folder.mkdir()
    save_file(sd, folder / "model.safetensors")
    (folder / "config.yaml").write_bytes((demo_model / "config.yaml").read_bytes())
    (folder / "tokenizer").symlink_to(demo_model / "tokenizer")
    return folder


def _rename_prefix(sd, old, new):
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


@pytest.mark.parametrize(
    "name, edit, needle",
    [
        ("sdxl", lambda sd: {"conditioner.embedders.0.transformer.x": torch.zeros(1),
                             **{k: v for k, v in sd.items() if not k.startswith("cond_stage_model")}}, "SDXL"),
        ("sd2", lambda sd: _rename_prefix(sd, "cond_stage_model.transformer.text_model.", "cond_stage_model.model."),
         "2.x"),
        ("inpaint", lambda sd: {**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
         "inpainting"),
        ("vae-only", lambda sd: {k[len("first_stage_model."):]: v for k, v in sd.items()
                                 if k.startswith("first_stage_model.")}, "VAE"),
        ("missing", lambda sd: {k: v for k, v in sd.items() if "output_blocks.2" not in k}, "missing"),
    ],
)
def test_other_architectures_are_named(demo_model, tmp_path, name, edit, needle, run_cli):
    folder = _variant(demo_model, tmp_path, name, edit)
    code, out, err = run_cli("generate", "x", "--model", folder, "--outdir", tmp_path, "--width", 64, "--height", 64)
    assert code == 1
    assert needle in err, err
    assert str(folder) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_damaged_files(tmp_path, demo_model):
    good = (demo_model / "model.safetensors").read_bytes()
    cases = {
        "empty.safetensors": b"",
        "truncated.safetensors": good[: len(good) // 2],
        "text.ckpt": b"hello, I am not a checkpoint\n" * 10,
        "truncated.ckpt": None,
    }
    zipped = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, zipped)
    cases["truncated.ckpt"] = zipped.read_bytes()[:200]
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            open_checkpoint(p)
        assert str(p) in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "full.ckpt").keys() and open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "absent.ckpt")


def test_model_hash_is_a1111s_and_remembered(tmp_path):
    import hashlib

    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(10.0)}, f)
    memo = tmp_path / "memo.json"
    digest = remembered_sha256(f, memo)
    assert digest == hashlib.sha256(f.read_bytes()).hexdigest()
    # Remembered: a lie planted in the memo is returned while path/size/mtime are unchanged...
    import json

    data = json.loads(memo.read_text())
    data[str(f.resolve())]["sha256"] = "a" * 64
    memo.write_text(json.dumps(data))
    assert remembered_sha256(f, memo) == "a" * 64
    # ...and a changed file is hashed again.
    save_file({"w": torch.arange(11.0)}, f)
    assert remembered_sha256(f, memo) == hashlib.sha256(f.read_bytes()).hexdigest()
    memo.write_text("{corrupt")
    assert remembered_sha256(f, memo) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_engine_reports_short_hash(demo_model):
    import hashlib

    e = Engine(open_model(demo_model), "cpu")
    assert e.models.model_hash == hashlib.sha256((demo_model / "model.safetensors").read_bytes()).hexdigest()[:10]


def test_a_remembered_download_hash_is_used_without_reading_the_file(tmp_path):
    from sdterm.engine.loading.file_hash import remember_sha256

    f = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(3)}, f)
    memo = tmp_path / "memo.json"
    remember_sha256(f, "b" * 64, memo)
    assert remembered_sha256(f, memo) == "b" * 64
