"""The reproducibility stamp: what it takes to render an image again and to explain a difference.

Every PNG sdterm writes carries it as the ``stamp`` key of its ``sdterm`` JSON chunk (beside the
request; A1111's ``parameters`` text is unchanged, and an image without it reads as before). One
flat object of text values (lists for the add-ons), :data:`FIELDS` in order:

* the software and machine: sdterm, Python, torch, CUDA and cuDNN versions, the device's name;
* how the numbers were computed: the U-Net's, VAE's and text encoder's dtypes (the VAE's is
  float32 when its fp16 decode overflowed and ran again), the attention backend (sdterm's networks
  compute attention with torch's ``scaled_dot_product_attention``; on CUDA the stamp names the
  SDPA kernels torch may pick), TF32 matmuls, the RNG source, the sampler and its resolved
  schedule, the memory plan (``Result.plan``: resident, staged, streamed, tiled VAE);
* the weights: the model's full sha256 (not only A1111's 10-digit hash), the external VAE's, each
  LoRA's and embedding's.

Cost: the model's sha256 is the one the engine computes anyway for A1111's ``Model hash`` (read
from the hash memo of the cache folder when path, size and mtime are unchanged: free after the
first render of a file). The add-ons' full hashes go through the same memo, here, when the image
is saved (after the render, on the render's worker thread in the app): a LoRA's file is read once
per change of the file, later renders find it in the memo.

:func:`gather` builds the stamp from the engine and its result (device, versions: outside the
engine, which knows nothing of PNGs); :func:`read_stamp` reads it back from the image (the
parameters' reader leaves it out of ``ImageParameters.extra``); :func:`differences` compares two. No UI imports.
"""

from __future__ import annotations

import functools
import json
import platform
from pathlib import Path
from typing import Any

from . import __version__

STAMP_KEY = "stamp"
"""The stamp's key in the ``sdterm`` JSON chunk."""

FIELDS: dict[str, str] = {
    "sdterm": "sdterm version", "python": "Python version", "torch": "torch version", "cuda": "CUDA version",
    "cudnn": "cuDNN version", "device": "device", "dtype_unet": "U-Net dtype", "dtype_vae": "VAE dtype",
    "dtype_text": "text encoder dtype", "attention": "attention", "tf32": "TF32 matmuls", "rng": "RNG source",
    "sampler": "sampler", "schedule": "schedule", "plan": "plan", "model": "model", "model_sha256": "model sha256",
    "vae": "VAE", "vae_sha256": "VAE sha256", "loras": "LoRAs", "embeddings": "embeddings",
}
"""Stamp key -> how the report names it, in the stamp's order."""

CAUSES = ("sdterm", "torch", "cuda", "cudnn", "device", "dtype_unet", "dtype_vae", "dtype_text", "attention", "tf32",
          "rng", "sampler", "schedule", "plan", "model_sha256", "vae_sha256", "loras", "embeddings")
"""The fields whose difference can change pixels (the model's and VAE's names can't: their hashes can)."""


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, read once), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device) -> dict[str, Any]:
    """The software and the device ``device`` (a ``torch.device``) a render runs on."""
    import torch

    cuda = getattr(device, "type", str(device)) == "cuda"
    if cuda:
        try:
            name = torch.cuda.get_device_name(device)
        except (RuntimeError, AssertionError, ValueError, TypeError):  # a stand-in's device, torch without CUDA
            name = None
        kinds = [k for k in ("flash", "mem_efficient", "cudnn", "math")
                 if getattr(torch.backends.cuda, f"{k}_sdp_enabled", lambda: False)()]
        attention = f"sdpa ({', '.join(kinds)})"
        tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    else:
        name, attention, tf32 = f"cpu: {cpu_name()}", "sdpa (cpu)", None
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {"sdterm": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "cudnn": None if cudnn is None else str(cudnn),
            "device": name, "attention": attention, "tf32": tf32}


def _sha256(path: str | Path | None, memo: Path | None) -> str | None:
    """The file's sha256 through the hash memo (None when there is no file or it can't be read)."""
    if not path:
        return None
    from .engine.loading.file_hash import remembered_sha256

    try:
        return remembered_sha256(path, memo)
    except OSError:
        return None


def _dtype(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def gather(engine, params, result) -> dict[str, Any]:
    """The stamp of ``result``, rendered by ``engine`` from ``params`` (a stand-in engine without
    models, device or dtype gives None for what it lacks)."""
    from .samplers import SAMPLERS, resolve_schedule

    models = getattr(engine, "models", None)
    memo = getattr(models, "hash_memo", None)
    dtype = _dtype(getattr(engine, "dtype", None))
    vae_fp32 = any(s.stage == "vae" and "fp32" in getattr(s, "note", "") for s in getattr(result, "stages", []))
    device = getattr(engine, "device", None)
    stamp = {**(environment(device) if device is not None else {}),
             "dtype_unet": dtype, "dtype_vae": "float32" if vae_fp32 else dtype, "dtype_text": dtype,
             "rng": params.rng, "sampler": params.sampler,
             "schedule": resolve_schedule(params.sampler, params.schedule) if params.sampler in SAMPLERS else None,
             "plan": getattr(result, "plan", None), "model": getattr(result, "model_name", None),
             "model_sha256": getattr(models, "sha256", None) if getattr(getattr(models, "source", None),
                                                                          "checkpoint", None) else None}
    vae_file = getattr(models, "vae_path", None)  # the external VAE's file (None: the checkpoint's own)
    stamp["vae"] = getattr(models, "vae_name", None)
    stamp["vae_sha256"] = _sha256(vae_file, memo)
    stamp["loras"] = sorted({f"{lo['name']} {_sha256(lo.get('file'), memo)}" for lo in getattr(result, "loras", [])})
    used = [e for role in getattr(result, "prompts", {}).values() for e in role.get("embeddings", [])]
    stamp["embeddings"] = sorted({f"{e['name']} {_sha256(e.get('file'), memo)}" for e in used})
    return {key: stamp.get(key) for key in FIELDS}


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp in the ``sdterm`` chunk of the image at ``path``; None when it has none (an older
    sdterm's image, A1111's), it isn't an object, or the chunk isn't JSON (the parameters' reader,
    :func:`sdterm.pngmeta.read_png_parameters`, says what is wrong with the image itself)."""
    from .imagetext import MetadataError, image_texts

    try:
        payload = json.loads(image_texts(Path(path))["sdterm"])
        stamp = payload[STAMP_KEY]
    except (MetadataError, KeyError, TypeError, ValueError, RecursionError):
        return None
    return stamp if isinstance(stamp, dict) else None


def value_text(value: Any) -> str:
    """A stamp value for one line of a report."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def differences(image: dict[str, Any], here: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, the image's value, this machine's) for each field of :data:`CAUSES` that differs,
    in the stamp's order; a field the image's stamp lacks (an older sdterm's) is not compared."""
    return [(FIELDS[key], value_text(image[key]), value_text(here.get(key)))
            for key in CAUSES if key in image and image[key] != here.get(key)]


def summary(stamp: dict[str, Any]) -> str:
    """One line: ``sdterm 0.1.0 · torch 2.5.1 CUDA 12.4 · NVIDIA H100 · float16 · DDIM Uniform · plan ...``."""
    cuda = f" CUDA {stamp['cuda']}" if stamp.get("cuda") else ""
    dtypes = {stamp.get(k) for k in ("dtype_unet", "dtype_vae", "dtype_text")} - {None}
    dtype = stamp.get("dtype_unet") if len(dtypes) == 1 else "/".join(
        value_text(stamp.get(k)) for k in ("dtype_text", "dtype_unet", "dtype_vae"))
    parts = [f"sdterm {value_text(stamp.get('sdterm'))}", f"torch {value_text(stamp.get('torch'))}{cuda}",
             value_text(stamp.get("device")), value_text(dtype), value_text(stamp.get("attention")),
             f"{value_text(stamp.get('sampler'))} {value_text(stamp.get('schedule'))}",
             f"rng {value_text(stamp.get('rng'))}", f"plan {value_text(stamp.get('plan'))}"]
    sha = stamp.get("model_sha256")
    if isinstance(sha, str):
        parts.append(f"model sha256 {sha[:16]}…")
    return " · ".join(parts)
