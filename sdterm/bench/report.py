"""``sdterm bench``'s table: one line per row, then sdterm's stages and the notes."""

from __future__ import annotations

from ..units import format_bytes
from .rows import BenchReport


def _fmt_seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _sampler_text(o) -> str:
    """"20 steps of DDIM", "20 steps of Heun (39 model calls: s/step is two calls but the last)"."""
    from ..samplers import combined_name, resolve_schedule

    name = combined_name(o.sampler, resolve_schedule(o.sampler, o.schedule))
    text = f"{o.steps} steps of {name}"
    if o.model_calls != o.steps:
        text += f" ({o.model_calls} model calls: an s/step figure is {o.model_calls / o.steps:.2g} calls)"
    return text


def _kind_lines(o) -> list[str]:
    if o.kind == "img2img":
        return [f"img2img from an init image the bench writes, denoising strength {o.init_strength:g}"]
    if o.kind == "hires":
        return [f"hires fix: x{o.hires_scale:g} ({o.hires_upscaler}), {o.hires_steps or o.steps} more steps at "
                f"strength {o.hires_strength:g}; size is first pass->final"]
    return []


def format_report(report: BenchReport) -> str:
    o = report.options
    lines = [
        f"sdterm bench  {report.card}  torch {report.torch_version}"
        + (f"  diffusers {report.diffusers_version}" if report.diffusers_version else "")
        + f"  {report.date}",
        f"model {report.model}, {report.dtype} on {report.device}, {_sampler_text(o)}, cfg {o.cfg:g}, "
        f"{o.repeats} timed render(s) after a warm-up (median; peaks are the max), prompt cached",
        *_kind_lines(o),
        "",
    ]
    # "vs compile" only when a diffusers + torch.compile row was timed: the table stays as narrow as before.
    compiled = any(r.ratio_compiled is not None for r in report.rows)
    head = ("size", "run", "peak alloc", "peak resvd", "s/render", "s/step", "vs gpu",
            *(("vs compile",) if compiled else ()), "plan")
    table = []
    for r in report.rows:
        run = f"sdterm {r.label}" if r.who == "sdterm" else f"diffusers {r.label}"
        if r.error:
            table.append((r.size, run, "-", "-", "-", "-", "-", *(("-",) if compiled else ()), f"error: {r.error}"))
            continue
        # sdterm's notices have their own lines below; a diffusers row's (the compile's first render) go here.
        plan = "; ".join([r.plan or "-", *(r.notices if r.who == "diffusers" else [])])
        table.append((
            r.size,
            run,
            format_bytes(r.peak_allocated),
            format_bytes(r.peak_reserved),
            _fmt_seconds(r.seconds_per_render),
            _fmt_seconds(r.seconds_per_step),
            _fmt_ratio(r.ratio),
            *((_fmt_ratio(r.ratio_compiled),) if compiled else ()),
            plan,
        ))
    widths = [max(len(str(x[i])) for x in [head, *table]) for i in range(len(head))]
    right = set(range(2, len(head) - 1))

    def fmt(cols) -> str:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths))]
        return "  ".join(cells).rstrip()

    lines.append(fmt(head))
    lines.extend(fmt(t) for t in table)
    staged = [r for r in report.rows if r.who == "sdterm" and r.stages]
    if staged:
        from ..engine.events import STAGE_TITLES

        lines += ["", "sdterm per stage: peak allocated / reserved, run seconds (median)"]
        for r in staged:
            parts = []
            for s in r.stages:
                mem = (
                    f"{format_bytes(s.peak_allocated)} / {format_bytes(s.peak_reserved)}"
                    if s.peak_allocated is not None
                    else "-"
                )
                extra = f", cache {s.cache}" if s.cache else ""
                parts.append(f"{STAGE_TITLES.get(s.stage, s.stage)} {mem}, {s.run_seconds:.3f}s{extra}")
            lines.append(f"  {r.size} {r.label}: " + "; ".join(parts))
            lines.extend(f"    engine: {n}" for n in r.notices)
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
