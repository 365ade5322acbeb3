"""What the engine reports while it works. Frozen dataclasses; the CLI and the TUI render them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Union

STAGES = ("text", "unet", "hires", "vae")
"""Stage order as data: text encoder -> U-Net denoising -> (the hires fix's second U-Net pass) -> VAE decode."""

STAGE_TITLES = {"text": "text encoder", "unet": "U-Net", "hires": "hires U-Net", "vae": "VAE decoder"}


@dataclass(frozen=True)
class StageStats:
    stage: str
    device: str
    """'cuda:0', 'cpu', ..."""
    load_seconds: float
    """Building/reading the model (first use) and moving it to the device."""
    run_seconds: float
    peak_allocated: int | None
    """Peak bytes allocated by torch on the device during the stage (counters reset at its start)."""
    peak_reserved: int | None
    """Peak bytes reserved by torch's caching allocator during the stage."""
    resident_start: int | None
    """Bytes allocated on the device when the stage started."""
    resident_end: int | None
    """Bytes allocated on the device when the stage ended (after its model went back to the host)."""
    device_free: int | None
    device_total: int | None
    host_rss: int
    """Resident set size of this process at the end of the stage (the figure that matters on CPU)."""
    cache: str | None = None
    """Text stage with an embedding cache: 'hit' (encoder not used), 'miss' or 'partial'."""
    cache_texts: dict[str, str] | None = None
    """Text stage: 'hit' or 'miss' for each text ('prompt', 'negative', 'padding')."""
    skipped: bool = False
    """The stage did no work on the device (e.g. every text came from the cache)."""
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StageStarted:
    stage: str
    phase: str
    """'loading' (model to device) or 'running'."""


@dataclass(frozen=True)
class StageFinished:
    stats: StageStats


@dataclass(frozen=True)
class StepDone:
    step: int
    """1-based."""
    total: int
    timestep: float
    """The step's timestep (DDIM, PLMS...) or sigma (the k-diffusion samplers), for display."""
    elapsed: float
    """Seconds since the first step started."""


@dataclass(frozen=True)
class MemorySample:
    """Memory right now (sampled at stage boundaries and after every U-Net step)."""

    stage: str
    allocated: int | None
    """Bytes torch has allocated on the device (None without CUDA)."""
    reserved: int | None
    device_free: int | None
    device_total: int | None
    host_rss: int


@dataclass(frozen=True)
class Preview:
    """A live preview frame (``sdterm/engine/preview.py``): the clean latent the sampler predicts
    after ``step`` of ``total`` (1-based) of ``stage`` ("unet", or "hires" for the hires fix's
    second pass), as an RGB PIL image (latent-sized, or image-sized from TAESD: ``scale``)."""

    stage: str
    step: int
    total: int
    image: object
    scale: int = 8
    """Image pixels per frame pixel: 8 for the latent-sized linear map, 1 for a TAESD frame."""


@dataclass(frozen=True)
class Notice:
    message: str
    level: str = "info"
    """'info' or 'warning'."""


Event = Union[StageStarted, StageFinished, StepDone, MemorySample, Notice, Preview]
Emit = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default ``emit``: drop events."""
