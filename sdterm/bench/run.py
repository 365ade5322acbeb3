"""Timing sdterm: one row per size x VRAM budget (a warm-up render, then the timed ones), and the
whole run (``run_bench``): sdterm's rows, then the diffusers reference's, ratios filled in."""

from __future__ import annotations

import datetime as _dt
import gc
import platform
import statistics
import tempfile
from pathlib import Path

from ..errors import UserError
from .device import budget_errors, clean_device, error_line, release_device
from .options import BenchOptions, Log, no_log
from .img2img import bench_img2img_reference, target_size, write_init_image
from .reference import bench_reference, reference_modes_to_run
from .rows import BenchReport, Row, StagePeak, add_ratios


def supports_budget(engine) -> bool:
    return hasattr(engine, "set_budget")


def make_engine(source, device: str, cache, budget: int | None, **kwargs):
    """``Engine(...)``, passing ``budget=`` only when there is one (engines before the VRAM budget
    take no such argument)."""
    import inspect

    from ..engine.pipeline import Engine

    if budget is not None:
        if "budget" not in inspect.signature(Engine).parameters:
            raise UserError("this sdterm's engine has no VRAM budget yet: use --budgets none")
        kwargs["budget"] = budget
    return Engine(source, device, cache=cache, **kwargs)


def preview_taesd(folder: Path) -> Path:
    """The TAESD file ``sdterm download taesd`` fetched, or one with random weights written into
    ``folder`` (its timing is the same: an architecture, not a picture, is measured)."""
    from .. import paths
    from ..cli.engine_setup import taesd_file

    found = taesd_file(paths.data_dir())
    if found is not None:
        return found
    import torch
    from safetensors.torch import save_file

    from ..engine.networks.taesd import TAESDDecoder

    path = folder / "taesd-random.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in TAESDDecoder().state_dict().items()}, str(path))
    return path


def bench_sdterm(engine, opts: BenchOptions, log: Log = no_log, folder: Path | None = None) -> list[Row]:
    """One row per size x budget: a warm-up render (fills the embedding cache, builds the models in
    host memory), then ``opts.repeats`` timed renders. With ``--init`` the init images are written
    into ``folder``."""
    rows: list[Row] = []
    soft = budget_errors()
    for w, h in opts.sizes:
        init = str(write_init_image(folder, w, h)) if opts.init_strength is not None else ""
        req = opts.request(w, h, init)
        for budget in opts.budgets:
            row = Row("sdterm", w, h, budget.label, budget=budget.bytes, target=target_size(req))
            watched = Row("sdterm", w, h, f"{budget.label} +preview", budget=budget.bytes,
                          target=target_size(req)) if opts.preview else None
            rows.extend([row] + ([watched] if watched else []))
            log(f"sdterm {row.size} budget {budget.label}: warm-up + {opts.repeats} timed"
                + (" (and as many with a preview every step, interleaved)" if watched else ""))
            try:
                if supports_budget(engine):
                    engine.set_budget(budget.bytes)
                elif budget.bytes is not None:
                    raise UserError("this sdterm's engine has no VRAM budget yet: use --budgets none")
                clean_device(engine.device)
                engine.generate(req)  # warm-up
                if watched:
                    engine.generate(req, preview=0.0)
                results, previewed = [], []
                for _ in range(opts.repeats):
                    gc.collect()  # the stage meters reset the peak counters themselves
                    results.append(engine.generate(req))
                    if watched:
                        gc.collect()
                        previewed.append(engine.generate(req, preview=0.0))
            except soft as exc:
                row.error = error_line(exc)
                if watched:
                    watched.error = row.error
                log(f"  {row.error}")
                clean_device(engine.device)
                continue
            _fill_sdterm_row(row, results, opts.steps)
            if watched:
                _fill_sdterm_row(watched, previewed, opts.steps)
    release_device(engine)
    return rows


def _fill_sdterm_row(row: Row, results: list, steps: int) -> None:
    row.plan = str(getattr(results[-1], "plan", "") or "")
    row.seconds = [r.seconds for r in results]
    by_stage: dict[str, list] = {}
    for r in results:
        for s in r.stages:
            by_stage.setdefault(s.stage, []).append(s)
    for stage, stats in by_stage.items():
        allocs = [s.peak_allocated for s in stats if s.peak_allocated is not None]
        reserved = [s.peak_reserved for s in stats if s.peak_reserved is not None]
        row.stages.append(
            StagePeak(
                stage=stage,
                peak_allocated=max(allocs) if allocs else None,
                peak_reserved=max(reserved) if reserved else None,
                run_seconds=statistics.median(s.run_seconds for s in stats),
                load_seconds=statistics.median(s.load_seconds for s in stats),
                cache=stats[-1].cache,
            )
        )
        if stage == "unet":
            row.step_seconds = [s.run_seconds / steps for s in stats]
    allocs = [s.peak_allocated for s in row.stages if s.peak_allocated is not None]
    reserved = [s.peak_reserved for s in row.stages if s.peak_reserved is not None]
    row.peak_allocated = max(allocs) if allocs else None
    row.peak_reserved = max(reserved) if reserved else None
    row.image = results[-1].image
    row.notices = list(dict.fromkeys(n for r in results for n in getattr(r, "notices", [])))


def card_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "CPU"
    n = torch.get_num_threads()
    return f"CPU ({cpu}, {n} thread{'s' if n != 1 else ''})"


def run_bench(source, device: str, opts: BenchOptions, *, log: Log = no_log, **engine_kwargs) -> BenchReport:
    """The whole measurement: sdterm's rows, then the reference's, ratios filled in.

    ``source`` is a ``ModelSource``; ``engine_kwargs`` go to ``Engine`` (data_dir, hash_memo).
    Each row keeps its last image (``Row.image``) so a caller can compare sdterm with diffusers.
    """
    import torch

    from ..engine.embedding_cache import EmbeddingCache
    from ..engine.memory.placement import resolve_device

    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    try:
        import diffusers

        diffusers_version: str | None = diffusers.__version__
    except ImportError:
        diffusers_version = None

    with tempfile.TemporaryDirectory(prefix="sdterm-bench-") as tmp:
        if opts.preview:  # TAESD previews too where the plan has room (the downloaded file, else random weights)
            engine_kwargs = {**engine_kwargs, "taesd": preview_taesd(Path(tmp))}
        engine = make_engine(source, device, EmbeddingCache(Path(tmp)), opts.budgets[0].bytes, **engine_kwargs)
        if not supports_budget(engine) and any(b.bytes is not None for b in opts.budgets):
            raise UserError("this sdterm's engine has no VRAM budget yet: use --budgets none")
        engine.models.tokenizer  # a missing tokenizer is reported before any work starts
        report = BenchReport(
            card=card_name(dev),
            device=str(dev),
            dtype=str(engine.dtype).removeprefix("torch."),
            torch_version=torch.__version__,
            diffusers_version=diffusers_version,
            date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            model=source.name,
            demo=source.demo,
            options=opts,
        )
        report.rows.extend(bench_sdterm(engine, opts, log, Path(tmp)))
        modes = reference_modes_to_run(opts, dev, report.notes)
        if opts.kind == "txt2img":
            report.rows.extend(bench_reference(engine, opts, modes, log))
        else:
            report.rows.extend(bench_img2img_reference(engine, opts, modes, log, Path(tmp), report.notes))
        del engine
        clean_device(dev)
    if opts.preview:
        report.notes.append("+preview rows: a preview at every step (the linear map; TAESD's decoder every 8th frame "
                            "and the last where the plan leaves it room)")
    add_ratios(report.rows)
    if report.demo:
        report.notes.append("random or demo weights: timings and memory are real, the images are noise")
    return report
