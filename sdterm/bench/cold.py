"""``sdterm bench --cold``: what a one-shot ``sdterm generate`` costs before and around its render,
in fresh processes, as a script calling it would see it.

The bench writes a single-file fp32 checkpoint of the architecture (random weights: the size of
``v1-5-pruned-emaonly.safetensors`` for SD v1), unless ``--model`` names one, and a stand-in CLIP
tokenizer into a data folder of its own. Then it runs ``sdterm generate`` three times as separate
processes with one fresh cache folder: the first ever (the model's hash computed, nothing
remembered), then the same command twice. For each: the wall time from spawning the process to its
exit, the render's own seconds (its ``--json``), the difference (start-up: interpreter, imports,
reading and converting the checkpoint, hashing), and the process's peak resident set. Last, one
more process renders two images (``-n 2``, one engine): its first render (models read, kernels
loaded, algorithms picked, graphs captured on the way) beside its second, the steady render.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .options import BenchOptions, Log, no_log

RUNS = 3


@dataclass
class ColdRun:
    wall: float
    render: float
    peak_rss: int | None

    @property
    def startup(self) -> float:
        return self.wall - self.render


@dataclass
class ColdReport:
    checkpoint: str
    checkpoint_bytes: int
    device: str
    steps: int
    size: tuple[int, int]
    runs: list[ColdRun] = field(default_factory=list)
    in_process: tuple[float, float] | None = None
    """The first and second render's seconds in one process (the figure of a first render)."""

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "checkpoint_bytes": self.checkpoint_bytes, "device": self.device,
                "steps": self.steps, "size": list(self.size),
                "runs": [{"wall": round(r.wall, 3), "render": round(r.render, 3), "startup": round(r.startup, 3),
                          "peak_rss": r.peak_rss} for r in self.runs],
                "first_and_second_render": list(self.in_process) if self.in_process else None}


def write_checkpoint(config_path: str | None, folder: Path) -> Path:
    """A single-file fp32 safetensors checkpoint of the architecture with random weights, under
    the original key names, in ``folder``."""
    import torch
    from safetensors.torch import save_file

    from ..config import default_config_path, load_model_config
    from ..engine.loading.demo import original_state_dict
    from ..engine.networks.clip import build_text_encoder
    from ..engine.networks.unet import UNetModel
    from ..engine.networks.vae import VAEDecoder, VAEEncoder

    cfg = load_model_config(config_path or default_config_path())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = build_text_encoder(cfg.text, None, torch.float32)
        sd = original_state_dict(text, UNetModel(cfg.unet), VAEDecoder(cfg.vae), VAEEncoder(cfg.vae))
    path = folder / "bench-random-fp32.safetensors"
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(path))
    return path


def run_cold(opts: BenchOptions, device: str, *, model: str | None = None, config: str | None = None,
             log: Log = no_log, runs: int = RUNS) -> ColdReport:
    """Measure ``runs`` fresh ``sdterm generate`` processes (see the module's doc)."""
    from ..download.catalog import tokenizer_dir
    from ..engine.loading.demo import write_tokenizer

    width, height = opts.sizes[0]
    with tempfile.TemporaryDirectory(prefix="sdterm-cold-") as tmp:
        tmp = Path(tmp)
        data, cache, out = tmp / "data", tmp / "cache", tmp / "out"
        write_tokenizer(tokenizer_dir(data))  # a stand-in for the CLIP tokenizer `sdterm download` fetches
        if model is None:
            log("writing a single-file fp32 checkpoint with random weights")
            ckpt = write_checkpoint(config, tmp)
        else:
            ckpt = Path(model).expanduser()
            if not ckpt.is_file():
                raise UserError(f"--model {model}: --cold times a single-file checkpoint; no such file")
        report = ColdReport(str(ckpt), ckpt.stat().st_size, device, opts.steps, (width, height))
        env = {**os.environ, "SDTERM_DATA_DIR": str(data), "SDTERM_CACHE_DIR": str(cache),
               "SDTERM_CONFIG_DIR": str(tmp / "config")}  # no settings of the user's in the way
        command = ["generate", opts.prompt, "--model", str(ckpt), "--seed", str(opts.seed), "--steps", str(opts.steps),
                   "-W", str(width), "-H", str(height), "--device", device, "--json", "--outdir", str(out),
                   "--no-history", "--sampler", opts.sampler, "--cfg", str(opts.cfg)]
        if config:
            command += ["--config", config]
        for i in range(runs):
            log(f"cold start {i + 1}/{runs}: sdterm generate in a fresh process"
                + (" (first ever: empty cache folder)" if i == 0 else ""))
            report.runs.append(_one(command, env, tmp / f"child-{i}.json")[0])
        log("one more process rendering twice: its first render beside its second")
        _, seconds = _one(command, env, tmp / "child-twice.json", twice=True)
        report.in_process = (seconds[0], seconds[-1])
    return report


def _one(command: list[str], env: dict, result_file: Path, twice: bool = False) -> tuple[ColdRun, list[float]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdterm.bench.cold_child", str(result_file), *command,
                           *(["-n", "2"] if twice else [])], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--cold: sdterm generate failed in its process: {tail}")
    seconds = [float(json.loads(line)["seconds"]) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if len(seconds) != (2 if twice else 1):
        raise UserError(f"--cold: expected {2 if twice else 1} render(s) from the process, got {len(seconds)}")
    child = json.loads(result_file.read_text(encoding="utf-8"))
    return ColdRun(wall, seconds[-1], child.get("peak_rss")), seconds


def format_cold(report: ColdReport) -> str:
    from ..units import format_bytes

    w, h = report.size
    lines = [f"sdterm bench --cold: `sdterm generate` in fresh processes, {report.steps} steps at {w}x{h} on "
             f"{report.device}, {Path(report.checkpoint).name} ({format_bytes(report.checkpoint_bytes)})", "",
             "run                  wall    render  start-up  peak RSS"]
    for i, r in enumerate(report.runs):
        name = "first ever" if i == 0 else f"again ({i})"
        rss = format_bytes(r.peak_rss) if r.peak_rss is not None else "-"
        lines.append(f"{name:<18} {r.wall:7.2f}s {r.render:7.2f}s {r.startup:8.2f}s  {rss}")
    if len(report.runs) > 1:
        again = statistics.median(r.wall for r in report.runs[1:])
        lines += ["", f"first ever {report.runs[0].wall:.2f} s wall; repeated (median) {again:.2f} s wall"]
    if report.in_process:
        first, second = report.in_process
        lines.append(f"in one process: first render {first:.2f} s, second {second:.2f} s ({first / second:.2f}x)")
    return "\n".join(lines)
