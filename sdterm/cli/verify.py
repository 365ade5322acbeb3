"""``sdterm verify IMAGE``: render an image's recorded request again and say whether the pixels
match (identical / within the tolerance / different) and which fields of its reproducibility stamp
differ from this machine. The procedure is ``sdterm/verify.py``; the image is only read."""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_ERROR, UserError
from ..options import whole_number


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``sdterm verify`` on ``parser.add_subparsers(...)``; returns its parser."""
    from ..verify import CPU_TOLERANCE, DEFAULT_TOLERANCE

    p = sub.add_parser(
        "verify",
        help="render an image's recorded request again and compare pixels and stamps",
        description="Renders the request stored in IMAGE (sdterm's, or AUTOMATIC1111's parameters) with the model "
                    "whose hash it records, compares the pixels and says which fields of the image's reproducibility "
                    "stamp differ from this machine. Exit 0 when the render is identical or within the tolerance, "
                    "1 otherwise. Nothing is written.",
    )
    p.add_argument("image", metavar="IMAGE", help="a PNG from sdterm (or AUTOMATIC1111)")
    p.add_argument("--model", metavar="PATH",
                   help="render with this model (default: the file in the models folder whose sha256 the image records)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    p.add_argument("--tolerance", metavar="N", type=whole_number, default=None,
                   help=f"the most levels (of 255) a pixel may differ by and still pass (default {DEFAULT_TOLERANCE} "
                        f"on a GPU, whose kernels may round differently in another memory plan; {CPU_TOLERANCE} "
                        "on the CPU, which reproduces itself exactly)")
    p.add_argument("--vram-budget", metavar="SIZE", default=None, help="VRAM budget, e.g. 3.5G (default: automatic)")
    p.add_argument("--vae", metavar="PATH", default=None,
                   help="the VAE file the image was decoded with (default: the one it names, from the vae folder)")
    p.add_argument("--embeddings", metavar="DIR", default=None, help="folder of textual-inversion embeddings")
    p.add_argument("--lora-dir", metavar="DIR", default=None, help="folder of LoRA files")
    p.add_argument("--config", metavar="YAML", help="architecture file (default: configs/sd-v1.yaml)")
    p.add_argument("--threads", metavar="N", type=whole_number, default=None, help="CPU threads for torch")
    return p


def run(args: argparse.Namespace) -> int:
    """``sdterm verify``: the verdict and its details on stdout; exit 1 when the pixels differ
    beyond the tolerance (the last line, on stderr, names the max diff)."""
    from ..resolve import apply_defaults, resolve_vae, user_config
    from ..verify import find_model, read_image, verify

    if args.tolerance is not None and not 0 <= args.tolerance <= 255:
        raise UserError(f"--tolerance must be between 0 and 255 levels, got {args.tolerance}")
    request = read_image(args.image)  # before torch: a PNG without parameters is answered at once
    cfg = user_config()
    args.no_cache, args.lora, args.history = True, None, False  # nothing of the render is kept
    given_vae = args.vae
    apply_defaults(args, cfg)
    args.vae = given_vae  # the image's VAE, not sdterm.yaml's default one
    found = request.found
    if args.vae is None and found.vae:
        path = resolve_vae(found.vae)
        if path is None or not path.is_file():
            raise UserError(f"the image was decoded with the VAE {found.vae!r}, not in the vae folder: "
                            "give it with --vae PATH")
        args.vae = str(path)
    model, note = (args.model, None) if args.model else find_model(
        request, cfg, progress=lambda text: print(f"  {text}…", file=sys.stderr))
    from .. import paths
    from .engine_setup import make_engine, start_device, start_driver

    start_driver(args)  # beside torch's import
    from ..engine.pipeline import open_model
    from ..service import RenderService
    from .generate import StderrProgress

    start_device(args)  # CUDA starts beside the model's opening
    engine = make_engine(open_model(model, config_path=args.config, data_dir=paths.data_dir()), args)
    print(f"rendering {request.path.name} again with {engine.source.name} on {engine.device}…", file=sys.stderr)
    service = RenderService(engine, paths.default_outdir())  # render only: nothing is saved
    verdict = verify(request, service, tolerance=args.tolerance, emit=StderrProgress(quiet=True),
                     notes=[note] if note else None)
    for line in verdict.lines():
        print(line, flush=True)
    if verdict.ok:
        return 0
    what = f"max diff {verdict.max_diff} levels" if verdict.max_diff is not None else "a different size"
    print(f"sdterm: verify: {request.path.name} differs ({what}, tolerance {verdict.tolerance})", file=sys.stderr)
    return EXIT_ERROR
