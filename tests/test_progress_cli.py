"""``sdterm generate --progress json`` and ``--preview FILE.png`` (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from .test_generate_cli import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


def test_progress_json_streams_steps_stages_and_the_result(demo_model, tmp_path, run_cli):
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--progress", "json",
                             "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]  # every line is one JSON object
    events = [line["event"] for line in lines]
    steps = [line for line in lines if line["event"] == "step"]
    assert [(s["step"], s["total"]) for s in steps] == [(i, len(steps)) for i in range(1, len(steps) + 1)]
    assert [line["stage"] for line in lines if line["event"] == "stage"] == ["text", "unet", "vae"]
    assert events[-1] == "result" and Path(lines[-1]["path"]).is_file() and lines[-1]["seed"] == 1
    assert events.index("result") > max(i for i, e in enumerate(events) if e == "step")
    assert "step" not in err  # the progress went to stdout, as JSON only


def test_preview_file_holds_the_last_frame(demo_model, tmp_path, run_cli):
    preview = tmp_path / "live.png"
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--preview", preview,
                             "--progress", "json", "--outdir", tmp_path / "out", *SMALL, "-W", 64, "-H", 48)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    frames = [line for line in lines if line["event"] == "preview"]
    assert frames and frames[-1]["step"] == frames[-1]["total"]  # the last step always makes one
    image = Image.open(preview)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed into place


@pytest.mark.parametrize("where, needle", [("missing/live.png", "doesn't exist"), (".", "is a folder")])
def test_a_preview_path_that_cannot_be_written_is_one_line(demo_model, tmp_path, run_cli, where, needle):
    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--preview", tmp_path / where,
                             "--outdir", tmp_path, *SMALL)
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))  # refused before rendering
