"""The render service: render, save (PNG with metadata, never overwriting) and record, the same for
``sdterm generate`` and the app; each front end saves and records each render exactly once."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sdterm.history import History, HistoryEntry
from sdterm.params import Params
from sdterm.pngmeta import read_png_parameters
from sdterm.service import RenderService, SaveError, publish_png
from sdterm.session import Session

from .test_app_snapshots import ScriptedEngine, ScriptedResult

PARAMS = Params("a red fox", negative="blurry", seed=5, steps=3, width=64, height=48, subseed=3, subseed_strength=0.2)


def result(params: Params = PARAMS) -> ScriptedResult:
    return ScriptedResult(Image.new("RGB", (params.width, params.height), (10, 20, 30)), params, [], demo=True)


def test_save_writes_the_png_with_its_metadata_and_never_overwrites(tmp_path):
    service = RenderService(ScriptedEngine(), tmp_path / "out")
    first, second = service.save(PARAMS, result()), service.save(PARAMS, result())
    assert [first.name, second.name] == ["00000-5.png", "00001-5.png"]
    found = read_png_parameters(first)
    assert (found.source, found.params, found.model_hash, found.extra) == ("sdterm", PARAMS, "6ce0161689", {"demo": "true"})
    with Image.open(first) as im:
        assert im.size == (64, 48) and "Variation seed: 3" in im.info["parameters"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-5.png", "00001-5.png"]  # no temporary left


def test_save_writes_the_renders_infotext_extras(tmp_path):
    """The engine's ``TI hashes`` reach both texts of the PNG, for generate and the app alike."""
    service = RenderService(ScriptedEngine(), tmp_path / "out")
    done = result()
    done.infotext_extra = {"TI hashes": "foxy: 0123456789ab"}
    path = service.save(PARAMS, done)
    with Image.open(path) as im:
        assert im.info["parameters"].endswith(', TI hashes: "foxy: 0123456789ab"')
        assert json.loads(im.info["sdterm"])["TI hashes"] == "foxy: 0123456789ab"
    assert read_png_parameters(path).embeddings == {"foxy": "0123456789ab"}


def test_a_failed_save_keeps_a_copy_and_says_where(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    service = RenderService(ScriptedEngine(), blocker)
    with pytest.raises(SaveError) as info:
        service.save(PARAMS, result())
    exc = info.value
    assert isinstance(exc, OSError) and exc.errno in (errno.EEXIST, errno.ENOTDIR) and exc.outdir == blocker
    assert exc.kept is not None and exc.kept.parent == tmp_path
    assert read_png_parameters(exc.kept).params == PARAMS


def test_record_appends_to_the_history(tmp_path):
    history = History(tmp_path / "h" / "history.jsonl")
    service = RenderService(ScriptedEngine(), tmp_path / "out", history)
    e = service.record(PARAMS, "outputs/00001-5.png", "abcd")
    assert (e.params, e.path, e.model_hash) == (PARAMS, "outputs/00001-5.png", "abcd")
    assert History(history.path).entries == [e]
    assert HistoryEntry.from_json(e.to_json()) == e  # its time parses
    assert service.record(PARAMS, None, "abcd").path is None  # not saved: recorded all the same
    assert len(history.entries) == 2
    assert RenderService(ScriptedEngine(), tmp_path / "out").record(PARAMS, None, "abcd") is None  # no history


def test_render_passes_the_params_and_the_events_through(tmp_path):
    events = []
    out = RenderService(ScriptedEngine(), tmp_path).render(PARAMS, emit=events.append)
    assert out.request == PARAMS and events


def test_the_service_imports_no_ui():
    code = ("import sys, sdterm.service; "
            "print([m for m in ('textual', 'rich', 'torch', 'sdterm.ui', 'sdterm.cli') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- each front end saves and records once per render --------------------------------------------


@pytest.fixture
def spied(monkeypatch):
    """Count RenderService.save and .record calls (the real methods still run)."""
    calls: list[tuple[str, Params]] = []
    save, record = RenderService.save, RenderService.record

    def spy_save(self, params, result):
        calls.append(("save", params))
        return save(self, params, result)

    def spy_record(self, params, path, model_hash, fork=None):
        calls.append(("record", params))
        return record(self, params, path, model_hash, fork)

    monkeypatch.setattr(RenderService, "save", spy_save)
    monkeypatch.setattr(RenderService, "record", spy_record)
    return calls


def test_generate_saves_and_records_once(demo_model, tmp_path, run_cli, spied):
    from sdterm.history import history_file

    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 9, "--outdir", tmp_path,
                             "--width", "64", "--height", "64", "--steps", "2")
    assert code == 0, err
    assert [name for name, _ in spied] == ["save", "record"] and spied[0][1] == spied[1][1]
    assert spied[0][1].prompt == "a red fox" and spied[0][1].seed == 9
    lines = [json.loads(line) for line in history_file().read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 1 and lines[0]["path"] == out.strip() and lines[0]["seed"] == 9


@pytest.mark.asyncio
async def test_the_app_saves_and_records_once(tmp_path, spied):
    from sdterm.ui.app import SdtermApp

    history = History(tmp_path / "history.jsonl")
    session = Session(Params(seed=4, steps=2, width=64, height=64), history, seed_locked=True)
    app = SdtermApp(RenderService(ScriptedEngine(), tmp_path / "out", history), session, image_protocol="halfcell")
    async with app.run_test(size=(100, 30)) as pilot:
        app.query_one("#prompt").value = "an owl"
        await pilot.press("enter")
        deadline = time.monotonic() + 10
        await pilot.pause()
        while app.busy and time.monotonic() < deadline:
            await pilot.pause(0.02)
        assert not app.busy
    assert [name for name, _ in spied] == ["save", "record"]
    assert spied[0][1] == spied[1][1] == Params("an owl", seed=4, steps=2, width=64, height=64)
    assert [e.path for e in History(history.path).entries] == [str(tmp_path / "out" / "00000-4.png")]
    assert session.last_path == str(tmp_path / "out" / "00000-4.png")


def test_publish_png_names_are_numbered_per_folder(tmp_path):
    assert publish_png(b"x", tmp_path, 1) == tmp_path / "00000-1.png"
    (tmp_path / "00041-9.png").write_bytes(b"older")
    assert publish_png(b"y", tmp_path, 2) == tmp_path / "00042-2.png"
    assert isinstance(publish_png(b"z", Path(tmp_path / "new"), 3), Path)
