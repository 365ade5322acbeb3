"""Write the README's screenshots (Textual's SVG export) into docs/screenshots/:

- ``main-120x40.svg``: the main screen after a render, the image focused (its keys in the footer);
- ``help-80x24.svg``: the help screen over the main screen at 80x24.

The real app renders on the tiny demo model (random weights: the image is noise, as the banner
says) on the CPU, so the screenshots show what ``sdterm demo-model demo && sdterm --model demo``
shows, not made-up figures. Cache, data and config go to a temporary folder, and nothing is
written to ./outputs.

    python scripts/screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a lighthouse at dusk, oil painting"


async def shoot(model: Path, work: Path, out: Path, size: tuple[int, int], name: str, help_screen: bool) -> Path:
    from textual import events
    from textual.widgets import Input

    from sdterm.engine.embedding_cache import EmbeddingCache
    from sdterm.engine.pipeline import Engine, open_model
    from sdterm.history import History
    from sdterm.params import Params
    from sdterm.service import RenderService
    from sdterm.session import Session
    from sdterm.ui.app import SdtermApp

    engine = Engine(open_model(model), "cpu", cache=EmbeddingCache(work / "embeddings"))
    params = Params(seed=42, steps=20, width=256, height=256, negative="blurry")
    history = History(work / f"history-{name}.jsonl")
    session = Session(params, history, seed_locked=True)
    # A relative output folder, so the notice line reads "saved outputs/00000-42.png".
    here = work / name
    here.mkdir()
    os.chdir(here)
    app = SdtermApp(RenderService(engine, Path("outputs"), history), session, image_protocol="halfcell")
    async with app.run_test(size=size) as pilot:
        for box in app.query(Input):
            box.cursor_blink = False
        app.post_message(events.Paste(PROMPT))
        await pilot.pause()
        await pilot.press("enter")
        deadline = time.monotonic() + 120
        await pilot.pause(0.1)
        while app.busy:
            if time.monotonic() > deadline:
                raise SystemExit("screenshots: the render did not finish in 120 s")
            await pilot.pause(0.1)
        await pilot.press("tab")
        if help_screen:
            await pilot.press("question_mark")
        await pilot.wait_for_scheduled_animations()
        await pilot.pause(0.2)
        return Path(app.save_screenshot(filename=f"{name}.svg", path=str(out)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"), help="where to write the SVGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="sdterm-screenshots-") as tmp:
        work = Path(tmp)
        for var in ("SDTERM_CACHE_DIR", "SDTERM_DATA_DIR", "SDTERM_CONFIG_DIR"):
            os.environ[var] = str(work / var.lower())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sdterm.engine.loading.demo import write_demo_model

        model = write_demo_model(work / "demo")
        cwd = os.getcwd()
        try:
            for size, name, help_screen in (((120, 40), "main-120x40", False), ((80, 24), "help-80x24", True)):
                path = asyncio.run(shoot(model, work, out.resolve(), size, name, help_screen))
                print(path)
        finally:
            os.chdir(cwd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
