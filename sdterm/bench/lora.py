"""``sdterm bench --lora-rank N``: what a LoRA costs. A random kohya-format LoRA of rank N on every
attention, projection and feed-forward layer of the U-Net and every layer of the text encoder
(what a typical trained LoRA touches), written by the bench itself; then, on one engine: reading
it, the first merge into both models, a change of weight (re-merges only what changed), taking it
out again, and a render with and without it (merged weights: no cost per step)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from .device import sync_device
from .options import BenchOptions, Log, no_log

NAME = "bench-lora"


def write_random_lora(cfg, folder: Path, rank: int) -> Path:
    """A kohya-format LoRA (LDM-style names) for ``cfg``'s transformer blocks and text encoder."""
    import torch
    from safetensors.torch import save_file

    from ..engine.lora.files import Targets

    targets = Targets(cfg)
    g = torch.Generator().manual_seed(rank)
    tensors = {}
    for key, name in {**targets.unet, **targets.text}.items():
        if name in targets.unet.values() and ".transformer_blocks." not in name and not name.endswith(
                ("proj_in", "proj_out")):
            continue
        shape = targets.shapes[name]
        r = min(rank, shape[0], shape[1:].numel())
        prefix = "lora_unet_" if name in targets.unet.values() else "lora_te_"
        tensors[f"{prefix}{key}.lora_down.weight"] = (torch.randn(r, *shape[1:], generator=g) * 0.01).half()
        tensors[f"{prefix}{key}.lora_up.weight"] = (torch.randn(shape[0], r, *(1,) * (len(shape) - 2),
                                                                generator=g) * 0.01).half()
        tensors[f"{prefix}{key}.alpha"] = torch.tensor(float(r) / 2)
    path = folder / f"{NAME}.safetensors"
    save_file(tensors, path)
    return path


def bench_lora(source, device: str, rank: int, opts: BenchOptions, log: Log = no_log) -> list[str]:
    """The LoRA timings as report lines."""
    from ..engine.pipeline import Engine

    with tempfile.TemporaryDirectory(prefix="sdterm-bench-lora-") as tmp:
        folder = Path(tmp)
        engine = Engine(source, device, lora_dirs=[folder])
        path = write_random_lora(engine.models.cfg, folder, rank)
        size = path.stat().st_size
        w, h = opts.sizes[0]
        plain = opts.request(w, h)
        tagged = plain.replace(prompt=f"{plain.prompt} <lora:{NAME}:1>")
        log(f"LoRA rank {rank} ({size / 2**20:.0f} MiB): warm-up renders")
        engine.generate(plain)  # builds the models, fills nothing else

        def timed(fn) -> float:
            sync_device(engine.device)
            t0 = time.perf_counter()
            fn()
            sync_device(engine.device)
            return time.perf_counter() - t0

        def merge(weight: float | None):
            prompt = plain.prompt if weight is None else f"{plain.prompt} <lora:{NAME}:{weight:g}>"
            _, loras = engine.loras.resolve(prompt, lambda *a, **k: None)
            for stage in ("text", "unet"):
                engine.merge_loras(stage, loras)

        t_read = timed(lambda: engine.loras.folders.load(NAME, engine.loras.targets))
        layers = sum(len(engine.loras.folders.load(NAME, engine.loras.targets).modules) for _ in [0])
        t_first = timed(lambda: merge(1.0))
        t_again = timed(lambda: merge(1.0))
        t_reweight = timed(lambda: merge(0.5))
        t_out = timed(lambda: merge(None))

        repeats = max(opts.repeats, 5)

        def renders(req) -> float:
            for _ in range(2):  # warm-up: the merge (or unmerge) and upload, and the GPU's clocks
                engine.generate(req)
            return statistics.median(engine.generate(req).seconds for _ in range(repeats))

        without, with_lora = renders(plain), renders(tagged)

    return [
        f"LoRA rank {rank}, {layers} layers ({size / 2**20:.0f} MiB file), {w}x{h}, {opts.steps} steps {opts.sampler}:",
        f"  read + map {t_read:.3f} s; first merge (text encoder + U-Net) {t_first:.3f} s; same LoRA again "
        f"{t_again * 1000:.1f} ms; weight 1 -> 0.5 {t_reweight:.3f} s; taken out {t_out:.3f} s",
        f"  render with it {with_lora:.3f} s, without {without:.3f} s (median of {repeats}, after two untimed)",
    ]
