"""The sampler, schedule, RNG, eta and ENSD in AUTOMATIC1111's infotext, written and read as A1111
1.10 does (``modules/processing.py`` ``create_infotext``, ``modules/sd_samplers.py``
``get_sampler_and_scheduler``, ``modules/sd_samplers_kdiffusion.py`` ``get_sigmas``), apart from
``pngmeta.py``, which calls :func:`schedule_pairs`, :func:`tail_pairs` and :func:`read_sampler`.

What A1111 writes: ``Sampler: <name>`` (no schedule in it), then ``Schedule type: <label>``; for a
k-diffusion sampler with its own default ("DPM++ 2M" -> Karras) "Automatic" is written resolved.
It writes ``Schedule type: Automatic`` otherwise, which sdterm leaves out (reading a text without it
gives "Automatic" in both). ``Denoising strength: s`` first, for an img2img render (a hires-fix
render: the hires pass's strength, in the same slot). ``ENSD: n`` when it isn't 0 and changes the image (:func:`uses_ensd`); ``RNG: CPU`` or ``RNG: NV`` (never for the default, GPU: a text
without ``RNG`` was drawn on the GPU, which sdterm's ``nv`` reproduces on any device); then
``Eta: x`` (ancestral and SDE samplers, when not 1) or ``Eta DDIM: x`` (DDIM, when not 0).
"""

from __future__ import annotations

from typing import Any

from .params import Params
from .samplers import RNG_INFOTEXT, SAMPLERS, schedule_name, split_sampler

RNG_FROM_TEXT = {text.casefold(): name for name, text in RNG_INFOTEXT.items()}
RNG_WHEN_MISSING = "nv"
"""A1111's default RNG is the GPU's: a text without ``RNG:`` reads as ``nv`` (the same numbers, any device)."""


def _g(x: float) -> str:
    return f"{x:g}"


def written_schedule(p: Params) -> str | None:
    """The ``Schedule type`` A1111 writes for ``p`` (None where it would write "Automatic")."""
    info = SAMPLERS[p.sampler]
    label = p.schedule
    if label == "Automatic" and info.k_diffusion and info.default_schedule != "Uniform":
        label = info.default_schedule  # A1111 has a scheduler option for it and records it
    return None if label == "Automatic" else label


def uses_ensd(p: Params) -> bool:
    """Whether ENSD changes the image: the sampler draws per-step noise (an ancestral sampler with
    eta > 0, LCM, DDIM with eta > 0). A1111 writes it only for its ancestral samplers (its
    ``uses_ensd``) though it reseeds for DDIM and LCM too; sdterm writes it wherever it matters, and
    A1111 applies an ``ENSD`` it reads whatever the sampler."""
    info = SAMPLERS[p.sampler]
    if p.sampler == "DDIM":
        return p.eta > 0
    return info.ancestral and not (info.k_diffusion and p.eta_ancestral == 0)


def schedule_pairs(p: Params) -> list[str]:
    """What follows ``Sampler: <name>``."""
    label = written_schedule(p)
    return [] if label is None else [f"Schedule type: {label}"]


def tail_pairs(p: Params) -> list[str]:
    """Denoising strength (img2img: whenever an init image is used, its default too; the hires
    fix: its pass's strength), ENSD, RNG and eta, after ``Model:`` and ``VAE:`` (A1111's order)."""
    info = SAMPLERS[p.sampler]
    out = [f"Denoising strength: {_g(p.strength)}"] if p.init_image else []
    if p.hires and not p.init_image:  # the validator refuses both at once
        out.append(f"Denoising strength: {_g(p.hires_strength)}")
    if p.ensd and uses_ensd(p):
        out.append(f"ENSD: {p.ensd}")
    if p.rng != "gpu":
        out.append(f"RNG: {RNG_INFOTEXT[p.rng]}")
    if info.uses_eta and info.k_diffusion and p.eta_ancestral != 1.0:
        out.append(f"Eta: {_g(p.eta_ancestral)}")
    if p.sampler == "DDIM" and p.eta:
        out.append(f"Eta DDIM: {_g(p.eta)}")
    return out


def read_sampler(settings: dict[str, str], typed: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """(sampler, schedule, rng fields, the settings keys they used) from a text's settings; ``typed``
    holds the fields already read (``eta``, ``eta_ancestral``...). An unknown sampler or schedule is
    left out (its text stays where the caller keeps it)."""
    out: dict[str, Any] = {}
    used: set[str] = set()
    split = split_sampler(settings["Sampler"]) if "Sampler" in settings else None
    schedule = None if split is None else split[1]
    label = settings.get("Schedule type")
    if label is not None and schedule_name(label) is not None:
        used.add("Schedule type")
        schedule = schedule or schedule_name(label)  # a combined name wins, as in A1111
    if split is not None:
        out["sampler"] = split[0]
        schedule = schedule or "Automatic"
        if schedule == SAMPLERS[split[0]].default_schedule:
            schedule = "Automatic"  # the sampler's own default: the same sigmas
        if split[0] == "DDIM" and "eta" not in typed and "eta_ancestral" in typed:
            out["eta"] = typed["eta_ancestral"]  # "Eta" with DDIM: an older writer's DDIM eta
    if schedule is not None:
        out["schedule"] = schedule
    rng = settings.get("RNG")
    if rng is None:
        if settings:
            out["rng"] = RNG_WHEN_MISSING
    elif rng.strip().casefold() in RNG_FROM_TEXT:
        out["rng"] = RNG_FROM_TEXT[rng.strip().casefold()]
        used.add("RNG")
    return out, used
