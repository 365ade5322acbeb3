"""Sampler, schedule and RNG names as AUTOMATIC1111 writes them: what ``--sampler``/``--schedule``/
``--rng``, the slash commands, the infotext, ``sdterm show`` and the history use.

A leaf (no torch): the parameter validator, the command line and the PNG reader check names here
without loading the engine. Each :class:`SamplerInfo` also says where the engine's function for it
lives (``sdterm.engine.sampling.<module>.<function>``) and how many model calls each step makes,
which the planner and the U-Net streamer need before the sampler runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    """AUTOMATIC1111's name ("DPM++ 2M"): what the infotext's ``Sampler:`` holds."""
    module: str
    """The engine module under ``sdterm.engine.sampling`` that implements it."""
    function: str
    """The function there: ``fn(ctx: SamplingContext, x) -> latents`` (see engine/sampling/base.py)."""
    aliases: tuple[str, ...] = ()
    """Other names A1111 and its descendants accept (``k_euler_a``, ``euler_ancestral``...)."""
    default_schedule: str = "Uniform"
    """What the "Automatic" schedule means for this sampler (A1111's per-sampler default)."""
    second_order: bool = False
    """Two model calls per step, one on the last (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE)."""
    extra_first_call: bool = False
    """One more model call on the first step (PLMS's pseudo improved Euler start)."""
    ancestral: bool = False
    """Draws fresh noise every step (so its image depends on the RNG after the start, and on ENSD)."""
    brownian: bool = False
    """Its per-step noise comes from a Brownian tree seeded by the seed (the SDE samplers)."""
    discard_next_to_last_sigma: bool = False
    """A1111 computes steps + 1 sigmas and drops the next-to-last (DPM2, DPM2 a, DPM++ 3M SDE)."""
    uses_eta: bool = False
    """The eta parameter means something for it (DDIM's eta; the ancestral samplers' eta)."""
    k_diffusion: bool = True
    """A k-diffusion sampler: runs over sigmas with a schedule. False: DDIM, PLMS, UniPC and LCM,
    which bring their own timesteps (the schedule setting doesn't apply)."""

    @property
    def deterministic(self) -> bool:
        """No noise after the starting noise (with eta 0 for the samplers that take eta)."""
        return not (self.ancestral or self.brownian)

    def step_calls(self, i: int, steps: int) -> int:
        """Model (denoiser) calls of step ``i`` of ``steps``."""
        last = i == steps - 1
        calls = 2 if (self.second_order and not last) else 1
        return calls + (1 if (self.extra_first_call and i == 0 and steps > 1) else 0)

    def calls(self, steps: int, start: int = 0) -> int:
        """Model calls of steps ``start`` ... ``steps - 1`` (a render resumed after ``start`` steps)."""
        return sum(self.step_calls(i, steps) for i in range(start, steps))


SAMPLER_LIST: tuple[SamplerInfo, ...] = (
    SamplerInfo("DPM++ 2M", "k_samplers", "sample_dpmpp_2m", ("k_dpmpp_2m",), default_schedule="Karras"),
    SamplerInfo("DPM++ SDE", "k_samplers", "sample_dpmpp_sde", ("k_dpmpp_sde",), default_schedule="Karras",
                second_order=True, brownian=True, uses_eta=True),
    SamplerInfo("DPM++ 2M SDE", "k_samplers", "sample_dpmpp_2m_sde", ("k_dpmpp_2m_sde",),
                default_schedule="Exponential", brownian=True, uses_eta=True),
    SamplerInfo("DPM++ 2S a", "k_samplers", "sample_dpmpp_2s_ancestral", ("k_dpmpp_2s_a",),
                default_schedule="Karras", second_order=True, ancestral=True, uses_eta=True),
    SamplerInfo("DPM++ 3M SDE", "k_samplers", "sample_dpmpp_3m_sde", ("k_dpmpp_3m_sde",),
                default_schedule="Exponential", brownian=True, discard_next_to_last_sigma=True, uses_eta=True),
    SamplerInfo("Euler a", "k_samplers", "sample_euler_ancestral", ("k_euler_a", "k_euler_ancestral"),
                ancestral=True, uses_eta=True),
    SamplerInfo("Euler", "k_samplers", "sample_euler", ("k_euler",)),
    SamplerInfo("LMS", "k_samplers", "sample_lms", ("k_lms",)),
    SamplerInfo("Heun", "k_samplers", "sample_heun", ("k_heun",), second_order=True),
    SamplerInfo("DPM2", "k_samplers", "sample_dpm_2", ("k_dpm_2",), default_schedule="Karras", second_order=True,
                discard_next_to_last_sigma=True),
    SamplerInfo("DPM2 a", "k_samplers", "sample_dpm_2_ancestral", ("k_dpm_2_a",), default_schedule="Karras",
                second_order=True, ancestral=True, discard_next_to_last_sigma=True, uses_eta=True),
    SamplerInfo("DDIM", "ddim", "run", ("ddim",), uses_eta=True, k_diffusion=False),
    SamplerInfo("PLMS", "plms", "run", ("plms",), extra_first_call=True, k_diffusion=False),
    SamplerInfo("UniPC", "unipc", "run", ("unipc",), k_diffusion=False),
    SamplerInfo("LCM", "lcm", "run", ("lcm", "k_lcm"), ancestral=True, k_diffusion=False),
)
"""Every sampler, in the order A1111 lists them."""

SAMPLERS: dict[str, SamplerInfo] = {s.name: s for s in SAMPLER_LIST}
DEFAULT_SAMPLER = "DDIM"

SCHEDULES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                              "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
"""A1111's "Schedule type" names ("Automatic": the sampler's own default)."""
DEFAULT_SCHEDULE = "Automatic"

SCHEDULE_ALIASES = {"uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal",
                    "ddim": "DDIM", "beta": "Beta", "automatic": "Automatic"}
"""A1111's internal schedule names (the API's ``scheduler``) -> their label."""

RNGS: tuple[str, ...] = ("cpu", "nv", "gpu")
"""Where noise comes from: torch's CPU generator (sdterm's default), A1111's "NV" (Philox, the
numbers torch.randn gives on an NVIDIA GPU, on any device), torch.randn on CUDA."""
DEFAULT_RNG = "cpu"
RNG_INFOTEXT = {"cpu": "CPU", "nv": "NV", "gpu": "GPU"}
"""How A1111's infotext writes each (``RNG: CPU``); a PNG without the field used the GPU."""


def _key(text: str) -> str:
    return " ".join(text.replace("_", " ").split()).casefold()


_BY_KEY = {_key(n): s.name for s in SAMPLER_LIST for n in (s.name, *s.aliases)}
_SCHEDULE_BY_KEY = {**{_key(n): n for n in SCHEDULES}, **{_key(a): n for a, n in SCHEDULE_ALIASES.items()}}


def sampler_name(text: str) -> str | None:
    """The sampler ``text`` names (any case, an A1111 alias), or None."""
    return _BY_KEY.get(_key(text))


def schedule_name(text: str) -> str | None:
    """The schedule ``text`` names (any case, A1111's internal name too), or None."""
    return _SCHEDULE_BY_KEY.get(_key(text))


def split_sampler(text: str) -> tuple[str, str | None] | None:
    """(sampler, schedule or None) for a sampler name as A1111 writes it, including the old combined
    names: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"), "LMS Karras" -> ("LMS", "Karras"), "Euler a"
    -> ("Euler a", None). None when no sampler is named."""
    name = sampler_name(text)
    if name is not None:
        return name, None
    words = text.split()
    for n in range(1, min(3, len(words))):  # a schedule of one or two words at the end
        schedule = schedule_name(" ".join(words[-n:]))
        name = sampler_name(" ".join(words[:-n]))
        if schedule is not None and name is not None and schedule != "Automatic":
            return name, schedule
    return None


def resolve_schedule(sampler: str, schedule: str) -> str:
    """The schedule a render uses: ``schedule``, or the sampler's default for "Automatic"."""
    return SAMPLERS[sampler].default_schedule if schedule == "Automatic" else schedule


def combined_name(sampler: str, schedule: str) -> str:
    """The old-style combined name for infotext readers that predate "Schedule type" ("DPM++ 2M
    Karras"); just the sampler's name for "Automatic" and "Uniform"."""
    return sampler if schedule in ("Automatic", "Uniform") or not SAMPLERS[sampler].k_diffusion else f"{sampler} {schedule}"
