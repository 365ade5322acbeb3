"""The VRAM budget planner: where every model lives for each stage, as a pure function.

Inputs are byte counts (weights per model and per U-Net unit, from meta-device modules) and
activation estimates per stage for the requested size; the output is a :class:`Plan` that
``placement.py`` executes. Preference order, cheapest in time first:

1. **resident** - everything fits: all models stay on the device across renders;
2. **U-Net resident** - the U-Net stays across renders, the text encoder and VAE are staged;
3. **staged** - one model at a time, uploaded from pinned host memory, the next upload
   overlapped with the current stage when both fit;
4. **streamed** - the deepest (most weight-heavy, least compute-heavy) U-Net units stay
   resident, the rest stream through a ring buffer on a side stream, prefetched ahead;

with a tiled VAE decode whenever the whole decode would not fit, and classifier-free guidance
split into two batch-1 passes when the batch of two does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .tiling import min_tile

MiB = 2**20
GiB = 2**30

MARGIN = 96 * MiB
"""Kept free for cuBLAS's workspace (32 MiB on Hopper), allocator rounding and small tensors."""
UNET_BYTES_PER_PIXEL = 320
"""U-Net activation peak per image pixel per batch item (fp16), calibrated on an H200 (512x512:
about 0.15 GiB for the batch of two)."""
UNET_FIXED = 48 * MiB
TEXT_ACTIVATION = 48 * MiB
MIN_RING_UNITS = 2
"""The ring must hold at least this many of the largest streamed unit for copy/compute overlap."""


class BudgetTooSmall(RuntimeError):
    """Even the cheapest plan does not fit; the message says what would."""


@dataclass(frozen=True)
class ModelSizes:
    text: int
    unet: int
    vae: int
    units: tuple[tuple[str, int, int], ...]
    """U-Net units in execution order: (name, bytes, depth level: 0 = full resolution)."""
    encoder: int = 0
    """The VAE encoder (img2img and pixel hires upscales only)."""


@dataclass(frozen=True)
class Plan:
    budget: int | None
    text: str = "staged"
    """'resident' (kept on the device), 'staged' (uploaded for the stage) or 'host' (CPU run)."""
    unet: str = "staged"
    """'resident', 'staged', 'streamed' or 'host'."""
    vae: str = "staged"
    resident_units: frozenset[int] = field(default_factory=frozenset)
    """Streamed U-Net: indices of the units that stay on the device."""
    ring_bytes: int = 0
    """Streamed U-Net: size of the device ring buffer the other units flow through."""
    split_cfg: bool = False
    """Run the unconditional and conditional U-Net passes one at a time (half the activations)."""
    vae_tile: int | None = None
    """Tiled VAE decode with this many latent pixels per tile side; None = whole."""
    prefetch_unet: bool = False
    """Upload the U-Net on a side stream while the text encoder runs."""
    prefetch_vae: bool = False
    """Upload the VAE on a side stream while the U-Net runs."""
    estimate: int = 0
    """The planner's estimate of the peak device bytes."""

    def describe(self, sizes: ModelSizes | None = None) -> str:
        if self.unet == "host":
            return "cpu"
        parts = []
        if self.unet == "streamed" and sizes is not None:
            kept = sum(sizes.units[i][1] for i in self.resident_units)
            parts.append(f"unet streamed ({kept / sizes.unet:.0%} resident, ring {self.ring_bytes / MiB:.0f} MiB)")
        else:
            parts.append(f"unet {self.unet}")
        if self.split_cfg:
            parts.append("cfg split")
        parts.append(f"text {self.text}")
        parts.append(f"vae {self.vae}" + (f" tiled {self.vae_tile * 8}px" if self.vae_tile else ""))
        return ", ".join(parts)


def unet_activation(width: int, height: int, batch: int) -> int:
    return UNET_FIXED + UNET_BYTES_PER_PIXEL * width * height * batch


def plan_render(
    sizes: ModelSizes,
    budget: int,
    width: int,
    height: int,
    *,
    vae_decode_bytes,
    vae_tile_for,
    cfg_batch: int = 2,
    text_needed: bool = True,
) -> Plan:
    """Choose the fastest plan whose estimated peak stays within ``budget`` bytes.

    ``vae_decode_bytes()`` estimates a whole decode's activations; ``vae_tile_for(available)``
    gives the tile (None = whole) whose decode fits ``available`` bytes. ``cfg_batch`` is 2 with
    guidance, 1 without.
    """
    usable = budget - MARGIN
    text_peak = sizes.text + TEXT_ACTIVATION if text_needed else 0
    act2 = unet_activation(width, height, cfg_batch)
    act1 = unet_activation(width, height, 1)
    whole_vae = vae_decode_bytes()

    def vae_part(avail: int) -> tuple[int | None, int]:
        """(tile, bytes) for the VAE stage given ``avail`` bytes for weights + activations."""
        if sizes.vae + whole_vae <= avail:
            return None, sizes.vae + whole_vae
        tile = vae_tile_for(max(avail - sizes.vae, 0))
        return tile, sizes.vae + (avail - sizes.vae)

    # 1. Everything resident.
    tile, vae_bytes = vae_part(usable - sizes.unet - sizes.text)
    need = sizes.text + sizes.unet + sizes.vae + max(act2, vae_bytes - sizes.vae, TEXT_ACTIVATION)
    if tile is None and need <= usable:
        return Plan(budget, text="resident", unet="resident", vae="resident", estimate=need + MARGIN)

    # 2. U-Net resident across renders; text and VAE staged around it (the VAE untiled).
    for split in (False, True):
        act = act1 if split else act2
        text_ok = not text_needed or sizes.unet + text_peak <= usable
        tile, vae_bytes = vae_part(usable - sizes.unet)
        if sizes.unet + act <= usable and text_ok and tile is None:
            return Plan(
                budget, text="staged", unet="resident", vae="staged", split_cfg=split,
                prefetch_vae=sizes.unet + act + sizes.vae <= usable,
                estimate=sizes.unet + max(act, vae_bytes, text_peak - sizes.unet if text_needed else 0) + MARGIN,
            )

    # 3. Staged: one model at a time (the VAE and the text encoder get the whole budget).
    tile, vae_bytes = vae_part(usable)
    for split in (False, True):
        act = act1 if split else act2
        if sizes.unet + act <= usable and text_peak <= usable:
            return Plan(
                budget, text="staged", unet="staged", vae="staged", split_cfg=split, vae_tile=tile,
                prefetch_unet=text_needed and sizes.text + TEXT_ACTIVATION + sizes.unet <= usable,
                prefetch_vae=sizes.unet + act + sizes.vae <= usable,
                estimate=max(sizes.unet + act, vae_bytes, text_peak) + MARGIN,
            )

    # 4. Streamed U-Net: deepest units resident, the rest through a ring.
    if text_peak > usable:
        raise BudgetTooSmall(f"the text encoder alone needs {(text_peak + MARGIN) / GiB:.2f} GiB")
    for split in (False, True):
        act = act1 if split else act2
        ring = MIN_RING_UNITS * max(b for _, b, _ in sizes.units)
        if usable - act - ring < 0:
            continue
        for _ in range(2):  # a smaller ring (only the streamed units need to fit) frees room
            resident = _choose_resident(sizes, usable - act - ring)
            streamed = [b for i, (_, b, _) in enumerate(sizes.units) if i not in resident]
            ring = MIN_RING_UNITS * max(streamed) if streamed else 0
        kept = sum(sizes.units[i][1] for i in resident)
        if streamed:
            ring += max(0, usable - act - kept - ring) // 2  # a deeper ring: more prefetch in flight
        return Plan(
            budget, text="staged", unet="streamed", vae="staged", split_cfg=split,
            resident_units=frozenset(resident), ring_bytes=ring, vae_tile=tile,
            estimate=max(kept + ring + act, vae_bytes, text_peak) + MARGIN,
        )
    need = MARGIN + act1 + MIN_RING_UNITS * max(b for _, b, _ in sizes.units)
    raise BudgetTooSmall(
        f"a {width}x{height} render needs at least {need / GiB:.2f} GiB of GPU memory; "
        f"the budget is {budget / GiB:.2f} GiB"
    )


def _choose_resident(sizes: ModelSizes, room: int) -> set[int]:
    """Fill ``room`` with the units that are worst to stream: deepest level first (most weights
    per unit of compute), larger first within a level."""
    order = sorted(range(len(sizes.units)), key=lambda i: (-sizes.units[i][2], -sizes.units[i][1]))
    chosen: set[int] = set()
    used = 0
    for i in order:
        b = sizes.units[i][1]
        if used + b <= room:
            chosen.add(i)
            used += b
    return chosen


def cheaper(plan: Plan, stage: str, sizes: ModelSizes, width: int, height: int) -> Plan | None:
    """The next plan to try after running out of memory in ``stage``; None if nothing is cheaper.

    A prefetch of the next stage's model overlapping ``stage`` is the first thing to go: it costs
    the least time and, in flight, holds a whole model's memory (1.6 GiB of U-Net during the text
    encoder)."""
    if stage == "text" and plan.prefetch_unet:
        return replace(plan, prefetch_unet=False)
    if stage == "unet" and plan.prefetch_vae:
        return replace(plan, prefetch_vae=False)
    if stage == "vae":
        current = plan.vae_tile or max(width, height) // 8
        new_tile = max(current // 2 // 8 * 8, min_tile())
        if new_tile < current:
            return replace(plan, vae="staged", vae_tile=new_tile, prefetch_vae=False)
        return None
    if stage == "unet":
        if plan.unet == "resident" or plan.unet == "staged":
            if not plan.split_cfg:
                return replace(plan, unet="staged", split_cfg=True, prefetch_vae=False, prefetch_unet=False)
            return replace(
                plan, unet="streamed", resident_units=frozenset(), text="staged", vae="staged",
                ring_bytes=MIN_RING_UNITS * max(b for _, b, _ in sizes.units), prefetch_vae=False,
                prefetch_unet=False,
            )
        if plan.unet == "streamed":
            if not plan.split_cfg:
                return replace(plan, split_cfg=True)
            if plan.resident_units:
                # Drop half of the resident units (the shallowest first).
                keep = sorted(plan.resident_units, key=lambda i: (-sizes.units[i][2], -sizes.units[i][1]))
                return replace(plan, resident_units=frozenset(keep[: len(keep) // 2]))
        return None
    if stage == "text":
        if plan.text == "resident" or plan.unet == "resident":
            return replace(plan, text="staged", unet="staged" if plan.unet == "resident" else plan.unet,
                           vae="staged", prefetch_unet=False)
        return None
    return None
