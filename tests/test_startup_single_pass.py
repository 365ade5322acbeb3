"""A checkpoint's first use in one pass (engine/loading/single_pass.py): the U-Net and the VAE
decoder are converted from the bytes read for the hash, on threads, from the moment the model is
opened; the weights, the hash and the pack are those of the ordinary path.

On the CPU with the tiny demo model (the pass is forced below its size threshold, and its spans
made small so that tensors are cut into rows)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from sdterm.engine.loading import models as models_mod
from sdterm.engine.loading import pack_format
from sdterm.engine.loading import single_pass as single_mod
from sdterm.engine.loading.checkpoint import CheckpointError
from sdterm.engine.loading.models import Models, open_model
from sdterm.engine.loading.single_pass import plan_spans
from sdterm.engine.loading.tensor_reader import TensorFile, read_header

from .test_model_cache import STAGES, Spies, _header, hold_file_hashes, load, published, same_weights, the_pack

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(demo_model, tmp_path) -> Path:
    return Path(shutil.copytree(demo_model, tmp_path / "model"))


@pytest.fixture
def single(monkeypatch):
    """Every checkpoint goes through the pass, in spans of 4 KiB (most tensors cut into rows)."""
    monkeypatch.setattr(models_mod, "SINGLE_PASS_BYTES", 0)
    monkeypatch.setattr(single_mod, "SPAN", 4096)


def _digest(model: Path) -> str:
    return hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()


def test_spans_cover_the_file_and_every_row_once(model):
    path = model / "model.safetensors"
    entries = read_header(path)
    size = path.stat().st_size
    wanted = {k for k in entries if k.startswith("model.diffusion_model.")}
    spans = plan_spans(entries, size, wanted, span=1000)
    assert spans[0].start == 0 and spans[-1].end == size
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    rows: dict[str, list[tuple[int, int]]] = {}
    for span in spans:
        for key, first, last, at in span.pieces:
            e = entries[key]
            row = e.nbytes // max(e.shape[0] if e.shape else 1, 1)
            assert span.start + at == e.start + first * row  # the piece's bytes are where the rows are
            assert span.start + at + (last - first) * row <= span.end
            rows.setdefault(key, []).append((first, last))
    assert set(rows) == wanted
    for key, parts in rows.items():
        e = entries[key]
        assert sorted(parts)[0][0] == 0 and sorted(parts)[-1][1] == (e.shape[0] if e.shape else 1)
        assert all(a[1] == b[0] for a, b in zip(sorted(parts), sorted(parts)[1:]))
    assert any(len(parts) > 1 for parts in rows.values())  # some tensors were cut into rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_first_use_in_one_pass_gives_the_same_models_hash_and_pack(model, tmp_path, single, dtype):
    memo = tmp_path / "hashes.json"
    cache = tmp_path / "packs"
    first = Models(open_model(model), dtype, model_cache=cache, hash_memo=memo)
    assert first._store.first_pass is not None and first._hash is first._store.first_pass
    for stage in STAGES:
        first.module(stage)
    published()
    reference = load(model, None, dtype)  # converted tensor by tensor, no pass
    assert same_weights(first, reference)
    assert first.sha256 == _digest(model)
    assert json.loads(memo.read_text())[str((model / "model.safetensors").resolve())]["sha256"] == _digest(model)
    header = _header(the_pack(cache))
    assert set(header["models"]) == set(STAGES) and header["sha256"] == _digest(model)
    assert list(header["models"]) == ["unet", "vae", "text"]  # the text encoder's layout came last


def test_the_pack_of_a_pass_is_read_back_verified(model, tmp_path, single, monkeypatch):
    cache = tmp_path / "packs"
    first = load(model, cache, torch.float16)
    spies = Spies(monkeypatch)
    second = load(model, cache, torch.float16)
    assert second._store.pack is not None and second._store.first_pass is None
    assert (spies.reads, spies.opens, spies.hashes) == (0, 0, 0)
    assert same_weights(first, second) and second.sha256 == _digest(model)


def test_the_pass_runs_while_the_caller_does_something_else(model, tmp_path, single, monkeypatch):
    """Opening the model returns before its weights are read; module() waits for them."""
    gate = threading.Event()
    real = single_mod.pread_full

    def held(fd, into, offset):
        assert gate.wait(30)
        return real(fd, into, offset)

    monkeypatch.setattr(single_mod, "pread_full", held)
    m = Models(open_model(model), torch.float32, model_cache=tmp_path / "packs")
    assert not m._hash.done()
    gate.set()
    for stage in STAGES:
        m.module(stage)
    assert m.sha256 == _digest(model)
    assert same_weights(m, load(model, None))


def test_a_read_error_in_the_pass_is_one_line_and_no_pack(model, tmp_path, single, monkeypatch):
    reference = load(model, None).module("unet").out[2].bias

    def failing(fd, into, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(single_mod, "pread_full", failing)
    cache = tmp_path / "packs"
    m = Models(open_model(model), torch.float32, model_cache=cache)
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        m.module("unet")
    with pytest.raises(OSError):
        m.sha256
    published()
    assert not pack_format.pack_files(cache) and not pack_format.temp_files(cache)
    monkeypatch.setattr(single_mod, "pread_full", lambda *a: (_ for _ in ()).throw(AssertionError("pass again")))
    again = m.module("unet")  # a retry reads the file the ordinary way
    assert torch.equal(again.out[2].bias, reference)


def test_a_changed_dtype_drops_the_pass(model, tmp_path, single):
    m = Models(open_model(model), torch.float32, model_cache=tmp_path / "packs")
    m.dtype = torch.float16
    assert m.module("unet").out[2].bias.dtype == torch.float16
    assert same_weights(m, load(model, None, torch.float16))
    assert m.sha256 == _digest(model)


def test_a_bf16_or_odd_offset_source_is_converted_too(tmp_path):
    """Sources numpy can't view (bf16) or at an offset odd for their dtype go through a copy."""
    from safetensors.torch import save_file

    from sdterm.engine.loading.single_pass import SinglePass

    tensors = {"a": torch.arange(7, dtype=torch.int8), "b": torch.randn(5, 3).to(torch.bfloat16),
               "c": torch.randn(4, 6)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    entries = TensorFile(path).entries
    outs = {"b": torch.empty(5, 3, dtype=torch.float16), "c": torch.empty(6, 4, dtype=torch.float16).t()}
    done: list[str] = []
    p = SinglePass(path, entries, {"b": ("s", 0, outs["b"]), "c": ("s", 1, outs["c"])},
                   {("s", 0): outs["b"], ("s", 1): outs["c"]}, sha256=True, on_unit=None,
                   on_stage=done.append, on_error=lambda exc: None)
    p.model("s")
    assert p.result() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(outs["b"], tensors["b"].half())
    assert torch.equal(outs["c"], tensors["c"].half())
    assert done == ["s"]


def test_a_tensor_at_an_odd_offset_is_converted(tmp_path):
    """A file whose fp32 tensor starts at an offset no float can be read from in place (a
    hand-made header: the safetensors writer aligns its tensors)."""
    import struct

    from sdterm.engine.loading.single_pass import SinglePass

    c = torch.randn(4, 6)
    header = json.dumps({"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
                         "c": {"dtype": "F32", "shape": [4, 6], "data_offsets": [1, 97]}}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-aligned, so "c" starts at an odd offset
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x07" + c.numpy().tobytes())
    entries = read_header(path)
    assert entries["c"].start % 4 == 1
    out = torch.empty(4, 6, dtype=torch.float16)
    p = SinglePass(path, entries, {"c": ("s", 0, out)}, {("s", 0): out}, sha256=False, on_unit=None,
                   on_stage=lambda stage: stage, on_error=lambda exc: None)
    assert p.model("s") == "s" and p.result() is None
    assert torch.equal(out, c.half())


def test_pinned_models_of_the_pass_are_locked_at_their_exact_size(model, tmp_path, single, monkeypatch):
    """With ``pin`` (a GPU) the pass fills plain page-aligned buffers, page-locked once each model
    is complete (on the pass's thread: CUDA's start-up overlaps the reading)."""
    from sdterm.engine.memory import host_memory

    registered: list[tuple[int, int, str]] = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            registered.append((ptr, size, threading.current_thread().name))
            return 0

        def cudaHostUnregister(self, ptr):
            return 0

    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(host_memory, "_cudart", lambda: FakeCudart())
    m = load(model, tmp_path / "packs", pin=True)
    assert m._store.first_pass is not None
    assert len(registered) == len(STAGES)
    for stage in STAGES:
        hosts = m.unit_hosts(stage)
        assert (hosts[0].data_ptr(), sum(h.numel() for h in hosts)) in [r[:2] for r in registered]
    assert sum(name.startswith("sdterm-first") for _, _, name in registered) == 2  # the U-Net and the VAE
    assert same_weights(m, load(model, None))


def test_a_hash_begun_before_the_models_is_theirs_and_the_pass_reads_unhashed(model, tmp_path, single, monkeypatch):
    """The command line begins the file's sha256 before it imports torch: the models wait for
    that hash, and their pass converts without hashing (no second sha256 of the file)."""
    from sdterm.engine.loading import hasher

    gate = hold_file_hashes(monkeypatch)
    memo = tmp_path / "hashes.json"
    path = model / "model.safetensors"
    begun = hasher.begin(path, memo)
    assert begun is not None and hasher.begin(path, memo) is begun and not begun.done()
    m = Models(open_model(model), torch.float32, model_cache=tmp_path / "packs", hash_memo=memo)
    assert m._hash is begun and m._store.first_pass is not None and m._store.first_pass._hash is None
    for stage in STAGES:
        m.module(stage)  # the pass is not held back by the hash
    assert not begun.done()
    gate.set()
    assert m.sha256 == _digest(model) and m._store.first_pass.result() is None
    assert same_weights(m, load(model, None))
    assert hasher.begin(path, memo) is None  # remembered now: nothing to hash
    path.touch()  # another version of the file: never the old hash
    assert hasher.running(path) is None


def test_the_digest_is_not_held_back_by_a_stage_being_finished(model, tmp_path, single, monkeypatch):
    """The pass's sha256 is known as soon as the last byte is hashed, while a stage is still
    being finished (page-locked, adopted) on the finisher's thread."""
    from sdterm.engine.loading import store as store_mod

    gate = threading.Event()
    real = store_mod.HostStore._done

    def slow_done(self, *a, **k):
        assert gate.wait(30)
        return real(self, *a, **k)

    monkeypatch.setattr(store_mod.HostStore, "_done", slow_done)
    m = Models(open_model(model), torch.float32, model_cache=tmp_path / "packs")
    try:
        assert m._store.first_pass._digest.result(timeout=30) == _digest(model)
        assert not all(f.done() for f in m._store.first_pass.stages.values())
    finally:
        gate.set()
    assert same_weights(m, load(model, None))


def test_the_text_encoders_layout_is_made_without_holding_the_store(model, tmp_path, single, monkeypatch):
    """Laying out the text encoder imports transformers (seconds on a first start): the pass's
    thread must meanwhile be able to hand over the U-Net, which takes the store's lock."""
    from sdterm.engine.loading import store as store_mod

    inside, gate = threading.Event(), threading.Event()
    real = store_mod.meta_model

    def slow(stage, cfg):
        if stage == "text":
            inside.set()
            assert gate.wait(30)
        return real(stage, cfg)

    monkeypatch.setattr(store_mod, "meta_model", slow)
    m = Models(open_model(model), torch.float32, model_cache=tmp_path / "packs")
    building = threading.Thread(target=m.module, args=("text",))
    building.start()
    try:
        assert inside.wait(30)
        assert m._store._lock.acquire(timeout=5)  # not held while the layout is made
        m._store._lock.release()
        assert m._store.first_pass.model("unet") is not None
    finally:
        gate.set()
        building.join(30)
    assert same_weights(m, load(model, None))
