"""Snapshot tests of the app's look (pytest-textual-snapshot): the main screen after a render at
80x24 and 120x40, and the help screen.

The engine is a fake that plays a scripted event stream with fixed numbers and returns a fixed
image, so the screen is the same on every run and machine (STYLE lesson 11). Regenerate the SVGs
after a deliberate change of the look with ``pytest tests/test_app_snapshots.py --snapshot-update``
and look at them before committing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from PIL import Image
from textual import events
from textual.widgets import Input

from sdterm.engine.events import MemorySample, StageFinished, StageStarted, StageStats, StepDone
from sdterm.history import History
from sdterm.params import Params
from sdterm.service import RenderService
from sdterm.session import Session
from sdterm.ui.app import SdtermApp

MiB, GiB = 2**20, 2**30
TOTAL = 6 * GiB
"""The scripted GPU: 6 GiB, as on the machines sdterm is for."""


def scripted_image(width: int, height: int) -> Image.Image:
    """A fixed picture (a dusk sky over a sea, with a sun): deterministic, and easy to recognise
    in half-block cells."""
    image = Image.new("RGB", (width, height))
    px = image.load()
    horizon = height * 2 // 3
    for y in range(height):
        for x in range(width):
            if y < horizon:
                t = y / horizon
                px[x, y] = (int(40 + 200 * t), int(30 + 90 * t), int(110 - 40 * t))
            else:
                t = (y - horizon) / max(1, height - horizon)
                px[x, y] = (int(20 + 30 * (1 - t)), int(40 + 30 * (1 - t)), int(90 + 40 * (1 - t)))
            dx, dy = x - width * 0.62, y - horizon * 0.8
            if dx * dx + dy * dy < (width * 0.12) ** 2:
                px[x, y] = (255, 200, 90)
    return image


def _stats(stage: str, load: float, run: float, peak: int, reserved: int, cache=None, note="") -> StageStats:
    return StageStats(
        stage=stage,
        device="cuda:0",
        load_seconds=load,
        run_seconds=run,
        peak_allocated=peak,
        peak_reserved=reserved,
        resident_start=0,
        resident_end=0,
        device_free=TOTAL - reserved,
        device_total=TOTAL,
        host_rss=3 * GiB,
        cache=cache,
        cache_texts=None if cache is None else {"prompt": cache, "negative": cache},
        note=note,
    )


def _sample(stage: str, allocated: int) -> MemorySample:
    return MemorySample(stage, allocated, allocated + 128 * MiB, TOTAL - allocated - 512 * MiB, TOTAL, 3 * GiB)


@dataclass
class ScriptedResult:
    image: Image.Image
    request: object
    stages: list
    seconds: float = 2.84
    model_name: str = "v1-5-pruned-emaonly"
    model_hash: str = "6ce0161689"
    demo: bool = False
    plan: str = "staged: one model on the GPU at a time"
    notices: list = field(default_factory=list)


class ScriptedEngine:
    """What the app needs of an engine, playing a fixed event stream: the text encoder, each
    U-Net step with a memory sample, the VAE decoder; the same numbers every time."""

    def __init__(self) -> None:
        self.source = SimpleNamespace(name="v1-5-pruned-emaonly", demo=False)
        self.device = SimpleNamespace(type="cuda")
        self.cache = None
        self.budget = None

    def effective_budget(self) -> int | None:
        return self.budget if self.budget is not None else int(3.5 * GiB)

    def set_budget(self, budget: int | None) -> None:
        self.budget = budget

    def generate(self, req, *, emit, cancelled=lambda: False, **options) -> ScriptedResult:  # preview, trail, fork
        emit(StageStarted("text", "loading"))
        emit(StageStarted("text", "running"))
        emit(_sample("text", 246 * MiB))
        text = _stats("text", 0.41, 0.05, 262 * MiB, 288 * MiB, cache="miss", note="text staged")
        emit(StageFinished(text))
        emit(StageStarted("unet", "loading"))
        emit(StageStarted("unet", "running"))
        for step in range(1, req.steps + 1):
            emit(StepDone(step, req.steps, 1000 - step * 1000 // req.steps, 0.08 * step))
            emit(_sample("unet", 1720 * MiB + step * MiB))
        unet = _stats("unet", 0.62, 0.08 * req.steps, 1850 * MiB, 1984 * MiB, note="unet staged")
        emit(StageFinished(unet))
        emit(StageStarted("vae", "loading"))
        emit(StageStarted("vae", "running"))
        emit(_sample("vae", 420 * MiB))
        vae = _stats("vae", 0.12, 0.21, 1190 * MiB, 1408 * MiB, note="vae staged")
        emit(StageFinished(vae))
        return ScriptedResult(scripted_image(req.width, req.height), req, [text, unet, vae])


class ScriptedService(RenderService):
    def save(self, params, result) -> Path:
        """Instead of writing a file: the name the first image would get."""
        return self.outdir / f"00000-{params.seed}.png"


def scripted_app(tmp_path: Path, **params) -> SdtermApp:
    history = History(tmp_path / "history.jsonl")
    session = Session(Params(**{"seed": 42, "steps": 20, **params}), history, seed_locked=True)
    return SdtermApp(ScriptedService(ScriptedEngine(), Path("outputs"), history), session, image_protocol="halfcell")


async def render_prompt(pilot, prompt: str = "a lighthouse at dusk, oil painting") -> None:
    """Paste the prompt, press Enter, wait for the render and stop the cursor blinking."""
    app = pilot.app
    for box in app.query(Input):
        box.cursor_blink = False
    app.post_message(events.Paste(prompt))
    await pilot.pause()
    await pilot.press("enter")
    deadline = time.monotonic() + 10
    await pilot.pause()
    while app.busy and time.monotonic() < deadline:
        await pilot.pause(0.02)
    assert not app.busy
    await pilot.pause()


def test_main_screen_80x24(snap_compare, tmp_path):
    assert snap_compare(scripted_app(tmp_path), terminal_size=(80, 24), run_before=render_prompt)


def test_main_screen_120x40(snap_compare, tmp_path):
    async def run_before(pilot) -> None:
        await render_prompt(pilot)
        await pilot.press("tab")  # the image has the focus: the footer shows the seed keys

    assert snap_compare(scripted_app(tmp_path), terminal_size=(120, 40), run_before=run_before)


def test_help_screen_80x24(snap_compare, tmp_path):
    async def run_before(pilot) -> None:
        await render_prompt(pilot)
        await pilot.press("tab", "question_mark")

    assert snap_compare(scripted_app(tmp_path), terminal_size=(80, 24), run_before=run_before)
