from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own cache/data/config dirs: nothing touches the user's real ones."""
    base = tmp_path_factory.mktemp("dirs")
    for var in ("SDTERM_CACHE_DIR", "SDTERM_DATA_DIR", "SDTERM_CONFIG_DIR"):
        monkeypatch.setenv(var, str(base / var.lower()))
    monkeypatch.delenv("SDTERM_TOKENIZER", raising=False)
    monkeypatch.delenv("SDTERM_DEBUG", raising=False)  # a developer's own setting must not change what tests see
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """The networks are tiny: one thread is fast, and immune to oversubscription when other
    processes share the CPU (there, multi-threaded ops slowed these tests ~20x).

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The tiny random-weight model, written by the product's own writer."""
    from sdterm.engine.loading.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def demo_engine(demo_model):
    from sdterm.engine.pipeline import Engine, open_model

    return Engine(open_model(demo_model), "cpu")


def small_request(**kw):
    from sdterm.params import Params

    base = dict(prompt="a red fox", seed=1, steps=3, width=64, height=64)
    base.update(kw)
    return Params(**base)


def oom_on_call(fn, n: int, before=None):
    """``fn`` wrapped to raise CUDA's out-of-memory error on its ``n``-th call (after calling
    ``before()``, when given), and to call through otherwise: an OOM injected where the engine
    would meet a real one."""
    import torch

    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            if before is not None:
                before()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return fn(*args, **kwargs)

    return flaky


@pytest.fixture
def run_cli(capsys):
    """Run ``sdterm ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from sdterm.cli import main

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def reference_encoder(demo_model):
    """CLIPTextModel and CLIPTokenizer built by the test from the demo checkpoint file."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdterm.engine.loading.demo import demo_config
    from sdterm.engine.networks.clip import clip_config

    tok = CLIPTokenizer.from_pretrained(str(demo_model / "tokenizer"))
    model = CLIPTextModel(clip_config(demo_config(len(tok.get_vocab())).text))
    inner = getattr(model, "text_model", model)  # transformers 5 no longer nests it
    prefix = "cond_stage_model.transformer.text_model."
    sd = {k[len(prefix):]: v for k, v in load_file(str(demo_model / "model.safetensors")).items() if k.startswith(prefix)}
    missing, unexpected = inner.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    return model.eval(), tok


@pytest.fixture(scope="session")
def kd():
    """(k_diffusion.sampling, k_diffusion.external): the installed k-diffusion package's own code,
    the reference the sampler tests compare with (tests/kdiff_reference.py)."""
    from . import kdiff_reference

    try:
        return kdiff_reference.load()
    except (RuntimeError, ImportError) as exc:
        pytest.fail(f"the k-diffusion reference can't be loaded ({exc}); install it: {kdiff_reference.INSTALL_HINT}")
