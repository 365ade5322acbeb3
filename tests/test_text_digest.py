"""The prompt cache's key for a checkpoint is its text encoder's own digest (file_hash.py,
Models.encoder_id): checkpoints that share a text encoder share cached prompts, a changed text
encoder never hits, and a first use encodes its prompts without waiting for the whole file's
sha256 (the model hash, which only the saved image needs)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.loading import hasher
from sdterm.engine.loading.file_hash import TEXT_DIGEST, recall, remembered_sha256
from sdterm.engine.loading.models import Models
from sdterm.engine.pipeline import Engine, open_model

from .conftest import small_request
from .test_model_cache import hold_file_hashes

pytestmark = pytest.mark.usefixtures("one_thread")


def variant(demo_model: Path, folder: Path, prefix: str) -> Path:
    """The demo model with the first tensor under ``prefix`` changed."""
    shutil.copytree(demo_model, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = sorted(k for k in tensors if k.startswith(prefix))[0]
    tensors[key] = tensors[key] + 1
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def engine(model: Path, tmp_path: Path) -> Engine:
    return Engine(open_model(model), "cpu", cache=EmbeddingCache(tmp_path / "prompts"), hash_memo=tmp_path / "memo.json")


def test_checkpoints_with_one_text_encoder_share_cached_prompts(demo_model, tmp_path):
    other_unet = variant(demo_model, tmp_path / "unet", "model.diffusion_model.")
    other_text = variant(demo_model, tmp_path / "text", "cond_stage_model.")
    first = engine(demo_model, tmp_path).generate(small_request())
    assert first.stages[0].cache == "miss"
    shared = engine(other_unet, tmp_path).generate(small_request())
    assert shared.stages[0].cache == "hit" and shared.model_hash != first.model_hash
    assert engine(other_text, tmp_path).generate(small_request()).stages[0].cache == "miss"
    ids = {engine(m, tmp_path).models.encoder_id for m in (demo_model, other_unet, other_text)}
    assert len(ids) == 2 and all(i.startswith("text-sha256:") for i in ids)


def test_the_text_digest_is_remembered_per_version_of_the_file(demo_model, tmp_path, monkeypatch):
    from sdterm.engine.loading import models as models_module
    from sdterm.engine.loading import tensor_reader

    model = Path(shutil.copytree(demo_model, tmp_path / "m"))
    memo = tmp_path / "memo.json"
    parsed, read_header = [], tensor_reader.read_header
    for module in (tensor_reader, models_module):
        monkeypatch.setattr(module, "read_header", lambda path: parsed.append(path) or read_header(path))
    first = Models(open_model(model), torch.float32, hash_memo=memo)
    want = first.encoder_id
    assert len(parsed) == 1  # the checkpoint's header, parsed once for the models and the digest
    assert recall(model / "model.safetensors", memo, TEXT_DIGEST) == want.removeprefix("text-sha256:")
    again = Models(open_model(model), torch.float32, hash_memo=memo)
    assert again._text_digest == want.removeprefix("text-sha256:")  # no thread: from the memo
    (model / "model.safetensors").touch()
    changed = Models(open_model(model), torch.float32, hash_memo=memo)
    assert isinstance(changed._text_digest, hasher.BackgroundHash) and changed.encoder_id == want


def test_a_first_use_encodes_its_prompts_before_the_files_sha256_is_known(demo_model, tmp_path, monkeypatch):
    gate = hold_file_hashes(monkeypatch)
    model = Path(shutil.copytree(demo_model, tmp_path / "m"))
    e = engine(model, tmp_path)
    results = []
    render = threading.Thread(target=lambda: results.append(e.generate(small_request())))
    render.start()
    try:
        deadline = time.monotonic() + 60
        while EmbeddingCache(tmp_path / "prompts").stats().entries < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert EmbeddingCache(tmp_path / "prompts").stats().entries == 2  # both prompts encoded and stored
        assert not e.models._hash.done()
    finally:
        gate.set()
        render.join(60)
    assert results[0].model_hash == remembered_sha256(model / "model.safetensors", None)[:10]


def test_digests_recorded_at_once_on_two_threads_are_both_kept(tmp_path, monkeypatch):
    """The file's sha256 and its text encoder's digest finish on two threads: neither memo write
    may drop the other's (read, change and write back under one lock)."""
    from sdterm.engine.loading import file_hash

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 100)
    memo = tmp_path / "memo.json"
    both_read = threading.Barrier(2, timeout=2)
    real = Path.read_text

    def read_text(self, *a, **k):
        text = real(self, *a, **k)
        if self == memo:
            try:
                both_read.wait()  # without the lock both threads read the empty memo first
            except threading.BrokenBarrierError:
                pass
        return text

    memo.write_text("{}")
    monkeypatch.setattr(Path, "read_text", read_text)
    threads = [threading.Thread(target=file_hash.remember, args=(path, memo), kwargs={field: "a" * 64})
               for field in ("sha256", TEXT_DIGEST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert recall(path, memo) == "a" * 64 and recall(path, memo, TEXT_DIGEST) == "a" * 64
