"""``Engine.keep_text`` off (``sdterm generate`` with one prompt): the text encoder goes after the
text stage that used it, so a one-shot command's peak host memory does not carry it while the
U-Net is read and run. Nothing may still hold it (the first pass, the model cache's writes once
done, the placement, the LoRA state); a later render that needs it builds it again."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.loading import models as models_mod
from sdterm.engine.pipeline import Engine, open_model

from .conftest import small_request
from .test_model_cache import published

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(demo_model, tmp_path) -> Path:
    return Path(shutil.copytree(demo_model, tmp_path / "model"))


def watched_text_builds(engine: Engine) -> list[weakref.ref]:
    """Weak references to each text encoder the engine builds."""
    built: list[weakref.ref] = []
    make = engine.models.factories["text"]

    def build():
        module = make()
        built.append(weakref.ref(module))
        return module

    engine.models.factories["text"] = build
    return built


@pytest.mark.parametrize("use", ["first use, one pass", "from the model cache", "no model cache"])
def test_the_text_encoder_goes_after_its_stage_and_comes_back_when_needed(model, tmp_path, monkeypatch, use):
    models_dir = None if use == "no model cache" else tmp_path / "models"
    if use == "first use, one pass":
        monkeypatch.setattr(models_mod, "SINGLE_PASS_BYTES", 0)
    elif use == "from the model cache":
        Engine(open_model(model), "cpu", model_cache=models_dir).generate(small_request(prompt="warm"))
        published()
    req = small_request()
    engine = Engine(open_model(model), "cpu", cache=EmbeddingCache(tmp_path / "embeddings"), model_cache=models_dir)
    engine.keep_text = False
    built = watched_text_builds(engine)
    first = engine.generate(req)
    published()  # the model cache's writes hold the buffers until they are done
    gc.collect()
    assert len(built) == 1 and built[0]() is None  # nothing holds the encoder any more
    assert "text" not in engine.placement.models
    second = engine.generate(req.replace(seed=req.seed + 1))  # what `-n 2` does: the prompt is cached
    assert second.stages[0].skipped and len(built) == 1
    other = engine.generate(req.replace(prompt="a blue heron"))  # needs it again: built again
    assert not other.stages[0].skipped and len(built) == 2
    kept = Engine(open_model(model), "cpu")
    assert torch.equal(first.latents, kept.generate(req).latents)
    assert torch.equal(other.latents, kept.generate(req.replace(prompt="a blue heron")).latents)


def test_without_an_embedding_cache_the_text_encoder_stays(model):
    """No cache: every render needs the encoder again, so ``keep_text`` off keeps it."""
    engine = Engine(open_model(model), "cpu")
    engine.keep_text = False
    built = watched_text_builds(engine)
    engine.generate(small_request())
    engine.generate(small_request(seed=2))
    assert len(built) == 1 and built[0]() is not None


def test_when_the_cache_cannot_be_written_the_text_encoder_stays(model, tmp_path, monkeypatch):
    """The cache refuses the prompt (a full disk): the next render needs the encoder again, so it
    stays where it is instead of being read again."""
    engine = Engine(open_model(model), "cpu", cache=EmbeddingCache(tmp_path / "embeddings"))
    engine.keep_text = False
    built = watched_text_builds(engine)

    def refuse(*_args, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EmbeddingCache, "put_many", refuse)
    first = engine.generate(small_request())
    second = engine.generate(small_request(seed=2))
    assert engine.cache is None and not second.stages[0].skipped
    assert len(built) == 1 and built[0]() is not None and first.notices
