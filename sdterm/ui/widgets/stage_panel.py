"""The live stage panel: text encoder, U-Net and VAE rows with state, time and GPU memory."""

from __future__ import annotations

import time

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Sparkline, Static

from ...engine.events import STAGES, MemorySample, StageFinished, StageStarted, StepDone
from ...units import format_bytes
from ..text import plain

SHORT_TITLES = {"text": "text enc", "unet": "U-Net", "hires": "hires", "vae": "VAE"}
STATE_STYLE = {
    "waiting": "dim",
    "loading": "yellow",
    "running": "bold yellow",
    "done": "green",
    "resident": "green",
    "offloaded": "cyan",
    "cache hit": "bold green",
    "cancelled": "red",
}


class StagePanel(Vertical):
    """Renders engine events; knows nothing about how they are produced."""

    DEFAULT_CSS = """
    StagePanel { height: auto; }
    StagePanel #stages { height: auto; }
    StagePanel #memline { height: 1; color: $text-muted; }
    StagePanel #mem-spark { height: 1; margin: 0 1; }
    StagePanel #rate { height: 1; color: $text-muted; }
    """

    def __init__(self, cuda: bool, **kw) -> None:
        super().__init__(**kw)
        self.cuda = cuda
        self.reset()

    def reset(self, steps: int = 0, hires: bool = False) -> None:
        self.rows = {s: {"state": "waiting", "seconds": None, "now": None, "peak": None, "reserved": None, "note": ""}
                     for s in STAGES}
        self.started: dict[str, float] = {}
        self.samples: list[float] = []
        self.device_line = ""
        self.steps = steps
        self.hires = hires
        """The hires fix's second pass has its row only in a render that makes one."""
        self.step = 0
        self.rate = 0.0

    def compose(self) -> ComposeResult:
        yield Static(id="stages")
        yield Static(id="memline")
        yield Sparkline([], id="mem-spark")  # empty: a flat baseline (one value would draw a full bar)
        yield ProgressBar(total=1, show_eta=False, id="progress")
        yield Static("", id="rate")

    def on_mount(self) -> None:
        self.refresh_table()

    # ---- events ------------------------------------------------------------------------------

    def start(self, steps: int, hires: bool = False) -> None:
        self.reset(steps, hires)
        bar = self.query_one("#progress", ProgressBar)
        bar.update(total=steps, progress=0)
        self.query_one("#rate", Static).update(plain(""))
        self.query_one("#mem-spark", Sparkline).data = []
        self.refresh_table()

    def cancelled(self) -> None:
        for row in self.rows.values():
            if row["state"] in ("loading", "running"):
                row["state"] = "cancelled"
        self.refresh_table()

    def handle(self, event) -> None:
        if isinstance(event, StageStarted):
            row = self.rows[event.stage]
            row["state"] = event.phase
            self.started.setdefault(event.stage, time.perf_counter())
        elif isinstance(event, StageFinished):
            s = event.stats
            row = self.rows[s.stage]
            if s.skipped:
                row["state"] = "cache hit"
            elif s.device == "cpu":
                row["state"] = "done"
            else:
                row["state"] = "resident" if "resident" in s.note.split(",")[0] else "offloaded"
            row["seconds"] = s.load_seconds + s.run_seconds
            row["peak"] = s.peak_allocated if self.cuda else s.host_rss
            row["reserved"] = s.peak_reserved
            row["note"] = s.note
        elif isinstance(event, MemorySample):
            row = self.rows[event.stage]
            row["now"] = event.allocated if self.cuda else event.host_rss
            value = event.allocated if self.cuda else event.host_rss
            self.samples.append(value / 2**20)
            # Textual draws a lone sample as a full-height bar: wait for two.
            self.query_one("#mem-spark", Sparkline).data = self.samples[-200:] if len(self.samples) > 1 else []
            if self.cuda and event.device_total:
                used = event.device_total - event.device_free
                self.device_line = (
                    f"GPU used {format_bytes(used, 'short')} · free {format_bytes(event.device_free, 'short')} · total {format_bytes(event.device_total, 'short')}"
                )
            else:
                self.device_line = f"no GPU: on the CPU · host RSS {format_bytes(event.host_rss, 'short')}"
        elif isinstance(event, StepDone):
            self.step = event.step
            self.rate = event.step / event.elapsed if event.elapsed > 0 else 0.0
            self.query_one("#progress", ProgressBar).update(total=event.total, progress=event.step)
            eta = (event.total - event.step) / self.rate if self.rate else 0.0
            self.query_one("#rate", Static).update(plain(f"step {event.step}/{event.total} · {self.rate:.1f} it/s · ETA {eta:.1f}s"))
        self.refresh_table()

    def refresh_table(self) -> None:
        table = Table.grid(padding=(0, 1), expand=True)
        mem = "GPU" if self.cuda else "RSS"
        table.add_column("stage", width=8)
        table.add_column("state", width=10)
        table.add_column("sec", justify="right", width=5)
        table.add_column("now", justify="right", width=6)
        table.add_column("peak", justify="right", width=6)
        table.add_column("resvd", justify="right", width=6)
        table.add_row(*[Text(h, style="bold") for h in ("stage", "state", "sec", f"{mem}", "peak", "resvd")])
        now = time.perf_counter()
        for stage in STAGES:
            row = self.rows[stage]
            if stage == "hires" and not self.hires and row["state"] == "waiting":
                continue
            seconds = row["seconds"]
            if seconds is None and stage in self.started and row["state"] in ("loading", "running"):
                seconds = now - self.started[stage]
            # A Rich table reads a str cell as markup: every cell is a Text.
            table.add_row(
                Text(SHORT_TITLES[stage]),
                Text(row["state"], style=STATE_STYLE.get(row["state"], "")),
                Text("–" if seconds is None else f"{seconds:.2f}"),
                Text(format_bytes(row["now"], "short")),
                Text(format_bytes(row["peak"], "short")),
                Text(format_bytes(row["reserved"], "short") if self.cuda else "–"),
            )
        self.query_one("#stages", Static).update(table)
        self.query_one("#memline", Static).update(plain(self.device_line or ("GPU: idle" if self.cuda else "no GPU: on the CPU")))
