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
loaded, algorithms picked, graphs captured on the way) beside its second, the steady render, each
split into its time before the first stage and each stage's load and run. On a GPU, ``generate``
gives its render thread a head start before the first render (``Engine.warm_for``: the U-Net's
read, the attention's plans, the resident models uploaded, the U-Net's graph captured), so the
first render's figure leaves that out; the walls hold it. And
one process starts as the app does (``cold_app.py``): its models ready (read and, on a GPU, warmed
by the app's throwaway render at the starting size, made while the user types), then two renders:
the first render a user of the app waits for, beside the second.

A second table splits each process's wall time: the interpreter's start (to the child's ``main``),
the command outside its render (imports, opening the model, writing the output), the render with
each stage's load (the model built, read from the pack or waited for), and the exit (threads
joined, the exit handlers; a command that imported torch then skips the interpreter's teardown,
as the ``sdterm`` script does: ``cli._leave``).
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
STAGE_ORDER = ("prepare", "text", "unet", "hires", "vae")


@dataclass
class ColdRun:
    wall: float
    render: float
    peak_rss: int | None
    python: float | None = None
    """From spawning the process to the child's ``main`` (the interpreter's own start)."""
    exit: float | None = None
    """From the command's return to the process's end (joining threads, the exit handlers)."""
    loads: dict[str, float] = field(default_factory=dict)
    """The render's stages' load seconds (its ``--json``): building or reading each model."""

    @property
    def startup(self) -> float:
        return self.wall - self.render

    @property
    def before_render(self) -> float | None:
        """The command's own seconds outside its render: imports, opening the model, the output."""
        if self.python is None or self.exit is None:
            return None
        return self.wall - self.python - self.exit - self.render


@dataclass
class AppRun:
    ready: float
    """From spawning the process until its models were ready: opened, set up and, on a GPU, warmed
    by a throwaway render at the starting size (the app's screen is up meanwhile; the user types)."""
    first: float
    second: float
    peak_rss: int | None
    text_encoded: bool
    """Whether both renders ran the text encoder (new prompts, as a user types them)."""

    def to_dict(self) -> dict:
        return {"ready": round(self.ready, 3), "first": round(self.first, 4), "second": round(self.second, 4),
                "peak_rss": self.peak_rss, "text_encoded": self.text_encoded}


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
    in_process_stages: tuple[dict[str, float], dict[str, float]] | None = None
    """Where each of those two renders went: :func:`stage_seconds`."""
    app: AppRun | None = None
    """The app's start-up and first two renders in one more process (``cold_app.py``)."""
    notes: list[str] = field(default_factory=list)
    """What the reader needs to know to read the figures (printed below them)."""

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "checkpoint_bytes": self.checkpoint_bytes, "device": self.device,
                "steps": self.steps, "size": list(self.size),
                "runs": [{"wall": round(r.wall, 3), "render": round(r.render, 3), "startup": round(r.startup, 3),
                          "peak_rss": r.peak_rss, "python": r.python, "exit": r.exit,
                          "before_render": r.before_render, "loads": r.loads} for r in self.runs],
                "first_and_second_render": list(self.in_process) if self.in_process else None,
                "first_and_second_render_stages": list(self.in_process_stages) if self.in_process_stages else None,
                "app": self.app.to_dict() if self.app else None,
                "notes": list(self.notes)}


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
        text = build_text_encoder(cfg.text, torch.float32)
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
        _, seconds, renders = _one(command, env, tmp / "child-twice.json", twice=True)
        report.in_process = (seconds[0], seconds[-1])
        report.in_process_stages = (stage_seconds(renders[0]), stage_seconds(renders[-1]))
        log("one more process starting as the app does (warmed at its size), then rendering twice")
        flags = command[2:]  # the app's flags are generate's without the command and its prompt
        flags = [f for f in flags if f not in ("--json", "--no-history")]
        report.app = _app(opts.prompt, flags, env, tmp / "child-app.json")
    note = bytecode_note()
    if note:
        report.notes.append(note)
    return report


def bytecode_note() -> str | None:
    """A line when modules this process imported (those a ``generate`` imports too: the standard
    library's, torch's, sdterm's) have no cached bytecode: every process then compiled them from
    source, time that an installed package (bytecode compiled at install) does not pay. It happens
    under ``PYTHONDONTWRITEBYTECODE`` with a read-only install, and with a ``PYTHONPYCACHEPREFIX``
    holding only some packages' bytecode: Python then looks there alone, and compiles the rest,
    the standard library's included, in every process. None otherwise."""
    missing = uncached_modules()
    if not missing:
        return None
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return (f"note: {len(missing)} modules imported here have no cached bytecode ({shown}): every process compiled "
            "them from source (PYTHONDONTWRITEBYTECODE with a read-only install, or a PYTHONPYCACHEPREFIX that "
            "lacks them); for the figures an installed package gives, run `python -m compileall` once over the "
            "standard library and site-packages with the same PYTHONPYCACHEPREFIX")


def uncached_modules() -> list[str]:
    """Names of the imported modules, from the Python installation (its standard library and
    site-packages) or sdterm, whose bytecode is not where Python looks for it (sorted)."""
    import importlib.util
    import site

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(__file__).resolve().parents[1]),
             *getattr(site, "getsitepackages", list)(), getattr(site, "USER_SITE", None) or ""}
    torch_spec = importlib.util.find_spec("torch")
    if torch_spec is not None and torch_spec.origin:
        roots.add(str(Path(torch_spec.origin).parents[1]))  # a venv or --target folder outside the prefix
    roots_tuple = tuple(str(Path(r)).rstrip(os.sep) + os.sep for r in roots if r)  # "/" stays "/"
    names = []
    for name, module in list(sys.modules.items()):
        origin = getattr(getattr(module, "__spec__", None), "origin", None)
        if not origin or not origin.endswith(".py") or not origin.startswith(roots_tuple):
            continue
        if not Path(importlib.util.cache_from_source(origin)).exists():
            names.append(name)
    return sorted(names)


def _child(module: str, args: list[str], env: dict, what: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process; a :class:`UserError` with its last line of
    stderr when it fails (``what``: what failed, for the message)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"--cold: {what} failed in its process: {tail}")
    return proc


def stage_seconds(render: dict) -> dict[str, float]:
    """One render's ``--json`` split: ``prepare`` (before its first stage), then each stage's
    ``STAGE load`` (its model built, read or waited for) and ``STAGE run``."""
    out = {"prepare": float(render.get("prepare_seconds", 0.0))}
    for stage in render.get("stages", []):
        out[f"{stage['stage']} load"] = float(stage.get("load_seconds", 0.0))
        out[f"{stage['stage']} run"] = float(stage.get("run_seconds", 0.0))
    return out


def _one(command: list[str], env: dict, result_file: Path,
         twice: bool = False) -> tuple[ColdRun, list[float], list[dict]]:
    spawned, t0 = time.time(), time.perf_counter()
    proc = _child("sdterm.bench.cold_child", [str(result_file), *command, *(["-n", "2"] if twice else [])], env,
                  "sdterm generate")
    wall = time.perf_counter() - t0
    renders = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    seconds = [float(r["seconds"]) for r in renders]
    if len(seconds) != (2 if twice else 1):
        raise UserError(f"--cold: expected {2 if twice else 1} render(s) from the process, got {len(seconds)}")
    child = json.loads(result_file.read_text(encoding="utf-8"))
    run = ColdRun(wall, seconds[-1], child.get("peak_rss"))
    if "began" in child and "returned" in child:
        run.python = max(child["began"] - spawned, 0.0)
        run.exit = max(wall - (child["returned"] - spawned), 0.0)
    split = stage_seconds(renders[-1])
    run.loads = {name.removesuffix(" load"): v for name, v in split.items() if name == "prepare" or name.endswith(" load")}
    return run, seconds, renders


def _app(prompt: str, flags: list[str], env: dict, result_file: Path) -> AppRun:
    spawned = time.time()
    _child("sdterm.bench.cold_app", [str(result_file), prompt, *flags], env, "the app's start-up")
    child = json.loads(result_file.read_text(encoding="utf-8"))
    first, second = child["seconds"]
    return AppRun(max(child["ready"] - spawned, 0.0), first, second, child.get("peak_rss"), all(child["text_encoded"]))


def format_cold(report: ColdReport) -> str:
    from ..units import format_bytes

    w, h = report.size
    lines = [f"sdterm bench --cold: `sdterm generate` in fresh processes, {report.steps} steps at {w}x{h} on "
             f"{report.device}, {Path(report.checkpoint).name} ({format_bytes(report.checkpoint_bytes)})", "",
             "run                  wall    render  start-up  peak RSS"]
    for i, r in enumerate(report.runs):
        name = _run_name(i)
        rss = format_bytes(r.peak_rss) if r.peak_rss is not None else "-"
        lines.append(f"{name:<18} {r.wall:7.2f}s {r.render:7.2f}s {r.startup:8.2f}s  {rss}")
    if any(r.before_render is not None for r in report.runs):
        seen = {s for r in report.runs for s in r.loads}
        stages = [s for s in STAGE_ORDER if s in seen] + sorted(seen - set(STAGE_ORDER))
        lines += ["", "where the wall time went: python = the interpreter's start; command = imports, opening",
                  "the model and the output, outside the render; inside the render: prepare = before its first",
                  "stage (tokenizing, the prompt cache looked up, planning), load = each stage's model built,",
                  "read or waited for; exit = threads joined and the exit handlers", "",
                  f"{'run':<18} {'python':>8} {'command':>8} {'render':>8} "
                  + "".join(f"{s if s == 'prepare' else s + ' load':>11}" for s in stages) + f" {'exit':>8}"]
        for i, r in enumerate(report.runs):
            name = _run_name(i)
            loads = "".join(f"{r.loads[s]:10.2f}s" if s in r.loads else f"{'-':>11}" for s in stages)
            lines.append(f"{name:<18} {_secs(r.python)} {_secs(r.before_render)} {r.render:7.2f}s {loads} {_secs(r.exit)}")
    if len(report.runs) > 1:
        again = statistics.median(r.wall for r in report.runs[1:])
        lines += ["", f"first ever {report.runs[0].wall:.2f} s wall; repeated (median) {again:.2f} s wall"]
    if report.in_process:
        first, second = report.in_process
        lines.append(f"in one process: first render {first:.2f} s, second {second:.2f} s ({first / second:.2f}x)")
        if report.device != "cpu":  # generate's head start (render_thread.py) is outside the render's clock
            lines.append("  (on a GPU the command's head start (the U-Net's read, the attention's plans, the "
                         "resident models uploaded, the U-Net's graph captured) runs on the render thread before the "
                         "first render, beside the command's preparation: the walls above include it)")
        if report.in_process_stages:
            for name, split in zip(("first", "second"), report.in_process_stages):
                parts = ", ".join(f"{k} {v:.2f}" for k, v in split.items() if v >= 0.005 or k == "prepare")
                lines.append(f"  {name}: {parts} s")
    if report.app:
        a = report.app
        prompts = "new prompts, encoded" if a.text_encoded else "prompts from the embedding cache"
        rss = f", peak RSS {format_bytes(a.peak_rss)}" if a.peak_rss is not None else ""
        lines.append(f"the app: models ready (read, and warmed on a GPU) {a.ready:.2f} s after its start, then first "
                     f"render {a.first:.2f} s, second {a.second:.2f} s ({a.first / a.second:.2f}x; {prompts}{rss})")
    lines += report.notes
    return "\n".join(lines)


def _run_name(i: int) -> str:
    return "first ever" if i == 0 else f"again ({i})"


def _secs(value: float | None) -> str:
    return f"{value:7.2f}s" if value is not None else f"{'-':>8}"
