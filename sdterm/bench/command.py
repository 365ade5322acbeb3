"""``sdterm bench``: its flags (``add_parser``) and ``run``: measure, then print the table or the JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..options import hires_scale_number, number, sampler_choice, schedule_choice, whole_number
from .options import DEFAULT_BUDGETS, DEFAULT_PROMPT, DEFAULT_SIZES, REFERENCE_MODES, options_from_args
from .report import format_report
from .run import run_bench


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sdterm bench`` on ``parser.add_subparsers(...)``; returns its parser."""
    p = subparsers.add_parser(
        "bench",
        help="measure memory and speed per size x VRAM budget, beside diffusers on the same weights",
        description=(
            "Renders each size x budget (prompt cached, models already in host memory) and prints peak "
            "device memory per stage, seconds per render and per step, and the plan chosen, beside "
            "diffusers' StableDiffusionPipeline on the same weights when diffusers is installed."
        ),
    )
    p.add_argument("--model", metavar="PATH",
                   help="SD v1 checkpoint or model folder (default: full-size SD v1 with random weights)")
    p.add_argument("--config", metavar="YAML", help="architecture file (default: configs/sd-v1.yaml)")
    p.add_argument("--sizes", default=DEFAULT_SIZES, metavar="WxH,...",
                   help=f"image sizes, comma-separated (default {DEFAULT_SIZES})")
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, metavar="SIZE,...",
                   help=f"VRAM budgets such as 1G or 1536M; none = no budget (default {DEFAULT_BUDGETS})")
    p.add_argument("--steps", type=whole_number, default=20, help="sampling steps (default 20)")
    p.add_argument("--sampler", type=sampler_choice, default="DDIM", metavar="NAME",
                   help='sampler by A1111\'s name, e.g. "DPM++ 2M Karras", "Euler a" (default DDIM)')
    p.add_argument("--schedule", type=schedule_choice, default=None, metavar="NAME",
                   help="schedule type (default Automatic: the sampler's own, or a combined name's)")
    p.add_argument("--cfg", type=number, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--repeats", type=whole_number, default=2, help="timed renders per row after a warm-up (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="the prompt rendered")
    p.add_argument("--seed", type=whole_number, default=1, help="seed of every render (default 1)")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers")
    p.add_argument("--reference-modes", default=",".join(REFERENCE_MODES), metavar="MODE,...",
                   help=f"diffusers placements to measure: {', '.join(REFERENCE_MODES)} (default all; "
                        "compile's first render compiles the U-Net: about a minute per size on an H100)")
    p.add_argument("--json", action="store_true", help="print one JSON object (raw bytes and seconds)")
    p.add_argument("--init", type=number, default=None, metavar="S",
                   help="img2img rows: from an init image the bench writes, at denoising strength S (e.g. 0.6)")
    p.add_argument("--hires", type=hires_scale_number, default=None, metavar="X",
                   help="hires-fix rows: each size upscaled by X (e.g. 2) and refined; beside diffusers' "
                        "txt2img + latent upscale + img2img at the same sizes")
    p.add_argument("--hires-steps", type=whole_number, default=0, metavar="N",
                   help="with --hires: the second pass's steps (default: as --steps)")
    p.add_argument("--hires-strength", type=number, default=None, metavar="S",
                   help="with --hires: its denoising strength (default 0.7)")
    p.add_argument("--hires-upscaler", type=_upscaler, default=None, metavar="NAME",
                   help="with --hires: Latent (default), Lanczos, ... (A1111's names)")
    p.add_argument("--preview", action="store_true",
                   help="also time each sdterm row with a live preview at every step (a '+preview' row: its "
                        "cost, renders interleaved with the plain ones; TAESD every 8th frame where the plan has room)")
    p.add_argument("--cold", action="store_true",
                   help="instead of the table: time `sdterm generate` in fresh processes (first ever, then twice "
                        "again) on a single-file fp32 checkpoint the bench writes (or --model's): wall, render, "
                        "start-up seconds and peak host RSS; then a process's first render beside its second, "
                        "in generate and in the app (warmed at start-up)")
    p.add_argument("--lora-rank", type=whole_number, default=None, metavar="N",
                   help="also time a random rank-N LoRA: reading, merging, re-weighting, a render with it")
    return p


def _upscaler(text: str) -> str:
    from ..infotext_hires import upscaler_name
    from ..params import HIRES_UPSCALERS

    name = upscaler_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown upscaler {text!r}; one of: {', '.join(HIRES_UPSCALERS)}")
    return name


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    """``sdterm bench``: measure, then print the table (or the JSON)."""
    from .. import paths
    from ..engine.pipeline import open_model
    from ..resolve import random_weights_source

    opts = options_from_args(args)

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    if getattr(args, "cold", False):
        from .cold import format_cold, run_cold

        device = args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu")
        report = run_cold(opts, device, model=args.model, config=args.config, log=log)
        print(json.dumps(report.to_dict()) if args.json else format_cold(report), flush=True)
        return 0
    if args.model:
        source = open_model(args.model, config_path=args.config, data_dir=paths.data_dir())
        extra = {"data_dir": paths.data_dir(), "hash_memo": paths.hash_memo_file(),
                 "model_cache": paths.model_cache_dir()}
    else:
        source = random_weights_source(args.config)
        extra = {}

    report = run_bench(source, args.device, opts, log=log, **extra)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_report(report))
    if args.lora_rank:
        from .lora import bench_lora

        for line in bench_lora(source, args.device, args.lora_rank, opts, log):
            print(line, flush=True)
    return 0
