"""Loads k-diffusion's own ``sampling.py`` and ``external.py`` (the PyPI package ``k-diffusion``,
installed with ``--no-deps``) without running its ``__init__``, which imports wandb, torchvision,
scikit-image and more that the reference doesn't need.

A stub package module ``k_diffusion`` (its ``__path__`` the installed folder) goes into
``sys.modules``; ``utils.py`` is loaded with a stand-in ``torchvision.transforms.functional``
present only while it loads (it imports it at the top, for image helpers the samplers never
call); then ``sampling.py`` and ``external.py``, unchanged, from the installed files.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

INSTALL_HINT = "pip install --no-deps k-diffusion==0.1.1.post1"


def _package_dir() -> Path:
    if "k_diffusion" in sys.modules and getattr(sys.modules["k_diffusion"], "__path__", None):
        return Path(next(iter(sys.modules["k_diffusion"].__path__)))
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"k-diffusion (the test reference) is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"k_diffusion.{name}"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["k_diffusion"], name, module)
    return module


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external), the installed package's own code."""
    pkg = sys.modules.get("k_diffusion")
    if pkg is not None and hasattr(pkg, "sampling") and hasattr(pkg, "external"):
        return pkg.sampling, pkg.external
    folder = _package_dir()
    if not (folder / "sampling.py").is_file():
        raise RuntimeError(f"k-diffusion's sampling.py is missing from {folder}: {INSTALL_HINT}")
    stub = types.ModuleType("k_diffusion")
    stub.__path__ = [str(folder)]
    sys.modules["k_diffusion"] = stub
    saved = {n: sys.modules.get(n) for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}
    try:
        if saved["torchvision.transforms.functional"] is None:
            tv = types.ModuleType("torchvision")
            tv.__path__ = []
            transforms = types.ModuleType("torchvision.transforms")
            transforms.__path__ = []
            functional = types.ModuleType("torchvision.transforms.functional")
            tv.transforms, transforms.functional = transforms, functional
            sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                                "torchvision.transforms.functional": functional})
        _load("utils", folder / "utils.py")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    sampling = _load("sampling", folder / "sampling.py")
    external = _load("external", folder / "external.py")
    return sampling, external
