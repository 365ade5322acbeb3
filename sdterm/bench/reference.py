"""The diffusers reference for ``sdterm bench``: diffusers' ``StableDiffusionPipeline`` on sdterm's weights.

The engine's own modules are exported under the original single-file keys and converted with
diffusers' own converters (so the key mapping is diffusers', not ours), then put together into a
fresh pipeline with the same DDIM schedule and tokenizer. ``bench_reference`` places it in each
requested mode (``reference_modes``: all on the device, model or sequential CPU offload, group
offload with a stream, torch.compile) and times it like sdterm's rows: the prompt encoded once up
front, one warm-up render (timed too: with torch.compile it is the compile), then the timed ones
from the same x_T as sdterm's; rows come back as ``rows.Row``.

diffusers (and accelerate, for the offload modes) are imported only inside the functions that need
them, so this module, like the rest of the bench, imports without them.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass

from .device import budget_errors, clean_device, error_line, note_peaks, release_device, sync_device
from .options import BenchOptions, Log, no_log
from .reference_modes import MODE_PLANS, mode_error_line, mode_errors, mode_unavailable, place_pipeline, release_mode
from .rows import Row


# --------------------------------------------------------------------------------------------
# The pipeline on sdterm's weights
# --------------------------------------------------------------------------------------------


def diffusers_unet_kwargs(cfg) -> dict:
    """UNet2DConditionModel arguments for sdterm's SD v1 U-Net architecture (a ``UNetConfig``)."""
    levels = len(cfg.channel_mult)
    attn = [2**i in cfg.attention_resolutions for i in range(levels)]
    return dict(
        sample_size=64,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        only_cross_attention=False,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name: SD v1 gives the number of heads here
        use_linear_projection=False,
    )


def diffusers_vae_kwargs(cfg) -> dict:
    """AutoencoderKL arguments for sdterm's VAE architecture (a ``VAEConfig``)."""
    n = len(cfg.ch_mult)
    return dict(
        in_channels=cfg.out_ch,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=cfg.scale_factor,
    )


@dataclass
class ReferenceWeights:
    """sdterm's own weights under diffusers' names (tensors shared with the engine's host models)."""

    unet: dict
    vae: dict


def reference_weights(engine, encoder: bool = False) -> ReferenceWeights:
    """Export the engine's models under the original single-file keys and convert them with
    diffusers' own converters (so the key mapping is diffusers', not ours); ``encoder``: the VAE
    encoder's weights too (img2img)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ..engine.loading.demo import original_state_dict

    m = engine.models
    sd = original_state_dict(m.module("text"), m.module("unet"), m.module("vae"),
                             m.module("vae_encoder") if encoder else None)
    with torch.device("meta"):
        unet_cfg = dict(UNet2DConditionModel(**diffusers_unet_kwargs(engine.models.cfg.unet)).config)
        vae_cfg = dict(AutoencoderKL(**diffusers_vae_kwargs(engine.models.cfg.vae)).config)
    return ReferenceWeights(convert_ldm_unet_checkpoint(sd, unet_cfg), convert_ldm_vae_checkpoint(sd, vae_cfg))


def build_pipeline(engine, weights: ReferenceWeights, dtype):
    """A fresh StableDiffusionPipeline on the engine's weights, in ``dtype``, on the host."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from ..engine.networks.clip import clip_inner, reference_text_model

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(engine.models.cfg.unet))
    unet.load_state_dict(weights.unet, strict=True, assign=True)  # no copy of the U-Net's weights
    unet = unet.to(dtype).eval().requires_grad_(False)

    # Without the encoder's weights (text-to-image) it keeps diffusers' own init, never used.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**diffusers_vae_kwargs(engine.models.cfg.vae))
    missing, unexpected = vae.load_state_dict(weights.vae, strict=False)
    stray = [k for k in missing if not k.startswith(("encoder.", "quant_conv."))]
    if unexpected or stray:
        raise RuntimeError(f"VAE conversion mismatch: unexpected {unexpected[:3]}, missing {stray[:3]}")
    vae = vae.to(dtype).eval().requires_grad_(False)

    # transformers' CLIPTextModel (what diffusers runs) with the engine's text weights, copied:
    # diffusers moves (and hooks) its text encoder, the engine's stays as it is.
    with torch.device("meta"):
        text = reference_text_model(engine.models.cfg.text)
    clip_inner(text).load_state_dict(copy.deepcopy(engine.models.module("text").state_dict()), strict=True,
                                     assign=True)
    clip_inner(text).embeddings.register_buffer(
        "position_ids", torch.arange(engine.models.cfg.text.max_positions).expand((1, -1)), persistent=False)
    text = text.to(dtype).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(engine.models.tokenizer.folder), model_max_length=engine.models.cfg.text.max_positions
    )
    s = engine.models.cfg.schedule
    scheduler = DDIMScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=s.steps_offset,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Running and timing it
# --------------------------------------------------------------------------------------------


def reference_modes_to_run(opts: BenchOptions, device, notes: list[str]) -> tuple[str, ...]:
    """The requested modes that can run here; a note for each one skipped."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        if opts.reference_modes:
            notes.append("diffusers is not installed: no reference rows (pip install diffusers)")
        return ()
    if opts.reference_modes and opts.sampler != "DDIM":
        notes.append(f"no diffusers reference rows: they render with DDIM, not {opts.sampler}")
        return ()
    out = []
    for mode in opts.reference_modes:
        why = mode_unavailable(mode, device)
        if why:
            notes.append(f"diffusers {mode} skipped: {why}")
        else:
            out.append(mode)
    return tuple(out)


def bench_reference(engine, opts: BenchOptions, modes: tuple[str, ...], log: Log = no_log) -> list[Row]:
    """diffusers' StableDiffusionPipeline on the engine's weights: per mode a fresh pipeline, the
    prompt encoded once up front (outside the timing), then per size a warm-up and timed renders."""
    if not modes:
        return []
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # no advice about from_pretrained for hand-built models
    try:
        return _bench_reference(engine, opts, modes, log)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _bench_reference(engine, opts: BenchOptions, modes: tuple[str, ...], log: Log) -> list[Row]:
    import torch

    from ..engine.sampling.noise import latents_noise

    device, dtype = engine.device, engine.dtype
    release_device(engine)
    weights = reference_weights(engine)
    rows: list[Row] = []
    guided = opts.cfg > 1.0
    for mode in modes:
        mode_rows = [Row("diffusers", w, h, mode, mode=mode, plan=MODE_PLANS[mode]) for w, h in opts.sizes]
        rows.extend(mode_rows)
        soft = mode_errors(mode, budget_errors())
        clean_device(device)
        pipe = None
        try:
            pipe = build_pipeline(engine, weights, dtype)
            place_pipeline(pipe, mode, device)
            with torch.inference_mode():
                cond, uncond = pipe.encode_prompt(
                    opts.prompt, pipe._execution_device, 1, guided, negative_prompt=opts.negative
                )
            for row in mode_rows:
                log(f"diffusers {row.size} {mode}: warm-up + {opts.repeats} timed")
                try:
                    _reference_row(pipe, row, cond, uncond if guided else None, opts, device, latents_noise)
                except soft as exc:
                    row.error = mode_error_line(mode, exc, error_line)
                    log(f"  {row.error}")
                    clean_device(device)
        except soft as exc:
            for row in mode_rows:
                if not row.seconds and row.error is None:
                    row.error = mode_error_line(mode, exc, error_line)
            log(f"  {mode_error_line(mode, exc, error_line)}")
        finally:
            if pipe is not None:
                release_mode(pipe, mode)
                del pipe
            cond = uncond = None
            clean_device(device)
    return rows


def _reference_row(pipe, row: Row, cond, uncond, opts: BenchOptions, device, latents_noise) -> None:
    import torch

    steps = opts.steps
    marks: dict[int, float] = {}

    def on_step_end(_pipe, i, _t, _kwargs):
        # Per step = first to last step's end over steps - 1: the first step (which, with model
        # offload, also uploads the U-Net) is left out, as sdterm's upload is left out of its run time.
        if i == 0 or i == steps - 1:
            sync_device(device)
            marks[i] = time.perf_counter()
        return {}

    def render():
        noise, _ = latents_noise(opts.seed, row.width, row.height)  # the same x_T as sdterm's
        marks.clear()
        sync_device(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            image = pipe(
                prompt_embeds=cond,
                negative_prompt_embeds=uncond,
                latents=noise.to(cond.dtype),
                generator=torch.Generator("cpu").manual_seed(opts.seed),
                num_inference_steps=steps,
                guidance_scale=opts.cfg,
                width=row.width,
                height=row.height,
                output_type="pil",
                callback_on_step_end=on_step_end,
            ).images[0]
        sync_device(device)
        seconds = time.perf_counter() - t0
        per_step = (marks[steps - 1] - marks[0]) / (steps - 1) if steps > 1 else marks[0] - t0
        return image, seconds, per_step

    _, row.first_seconds, _ = render()  # warm-up: with torch.compile, the compile
    if row.mode == "compile":
        row.notices.append(f"first render {row.first_seconds:.1f} s (compiles)")
    for _ in range(opts.repeats):
        gc.collect()
        image, seconds, per_step = render()
        row.seconds.append(seconds)
        row.step_seconds.append(per_step)
        note_peaks(row, device)
        row.image = image


__all__ = [
    "MODE_PLANS",
    "ReferenceWeights",
    "bench_reference",
    "build_pipeline",
    "diffusers_unet_kwargs",
    "diffusers_vae_kwargs",
    "reference_modes_to_run",
    "reference_weights",
]
