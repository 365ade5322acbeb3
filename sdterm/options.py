"""The render-parameter flags: one per :class:`~sdterm.params.Params` field, shared by ``sdterm
generate``, the app (``sdterm`` with no command), the lines of a ``--from-file`` batch and
``sdterm bench``'s number flags.

A flag's ``dest`` is its field's name (``--subseed-strength`` -> ``subseed_strength``), so
:func:`params_from_args` needs no table: a new parameter is its field in ``params.py`` and its
``add_argument`` line here.
"""

from __future__ import annotations

import argparse

from .params import FIELDS, MAX_SEED, Params


def whole_number(text: str) -> int:
    """argparse type: an integer (the range is the validator's to check, with its own message)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def number(text: str) -> float:
    """argparse type: a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_render_options(p: argparse.ArgumentParser) -> None:
    """The parameter flags shared by ``generate`` and the app (and the device and budget flags).

    Short forms: ``-s`` steps, ``-S`` seed, ``-C`` cfg, ``-W`` width, ``-H`` height (``-h`` stays help)."""
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt (the unconditional text)")
    p.add_argument("-S", "--seed", type=whole_number, default=None, help=f"0..{MAX_SEED}; random when left out")
    p.add_argument("-s", "--steps", type=whole_number, default=None, help="DDIM steps (default 50)")
    p.add_argument("-C", "--cfg", type=number, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("-W", "--width", type=whole_number, default=None, help="multiple of 8 (default 512)")
    p.add_argument("-H", "--height", type=whole_number, default=None, help="multiple of 8 (default 512)")
    p.add_argument("--eta", type=number, default=0.0, help="DDIM eta, 0..1 (default 0: deterministic)")
    p.add_argument("--subseed", type=whole_number, default=0, help="variation seed (mixed in by --subseed-strength)")
    p.add_argument("--subseed-strength", type=number, default=0.0, help="variation strength 0..1 (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    p.add_argument(
        "--vram-budget",
        metavar="SIZE",
        default=None,
        help="GPU memory sdterm may use, e.g. 1.5G or 900M (default: the free memory minus 512 MiB)",
    )


def params_from_args(args: argparse.Namespace) -> Params:
    """The parameters the parsed flags give (not validated): each field from the attribute of its
    name, its default where the namespace has none (or None: a flag left out)."""
    given = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    return Params(**given)
