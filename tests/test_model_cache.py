"""The model cache (engine/loading/packed.py): a checkpoint's models in the run dtype, stored in
the placement's unit layout, read back verified; never trusted when stale or damaged.

On the CPU with the tiny demo model (a single-file fp32 safetensors checkpoint); the CUDA parts
(pinned buffers) are in test_cuda_model_cache.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdterm.engine.loading import file_hash as file_hash_mod
from sdterm.engine.loading import hasher as hasher_mod
from sdterm.engine.loading import models as models_mod
from sdterm.engine.loading import pack_format
from sdterm.engine.loading.models import Models, open_model
from sdterm.engine.loading.tensor_reader import TensorFile
from sdterm.engine.memory.planner import GiB, Plan
from sdterm.engine.pipeline import Engine

from .conftest import small_request

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ("text", "unet", "vae")
REQ = dict(width=64, height=48, steps=2)


def published() -> None:
    """Wait for every pack being written and published (on threads, which start more of their kind)."""
    while waiting := [t for t in threading.enumerate() if t.name == "sdterm-pack-publish" and t.is_alive()]:
        for t in waiting:
            t.join()


@pytest.fixture
def model(demo_model, tmp_path) -> Path:
    """A private copy of the demo model (tests change its file)."""
    return Path(shutil.copytree(demo_model, tmp_path / "model"))


def load(model: Path, cache: Path | None, dtype=torch.float32, **kw) -> Models:
    m = Models(open_model(model), dtype, model_cache=cache, **kw)
    for stage in STAGES:
        m.module(stage)
    published()
    return m


def weights(m: Models, stage: str) -> dict[str, torch.Tensor]:
    return m.module(stage).state_dict(keep_vars=False)


def same_weights(a: Models, b: Models) -> bool:
    for stage in STAGES:
        wa, wb = weights(a, stage), weights(b, stage)
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) and wa[k].dtype == wb[k].dtype for k in wa):
            return False
    return True


def the_pack(cache: Path) -> Path:
    files = pack_format.pack_files(cache)
    assert len(files) == 1, files
    return files[0]


class Spies:
    """Counts reads of checkpoint weights, checkpoint opens and hashing."""

    def __init__(self, monkeypatch):
        self.reads = self.opens = self.hashes = 0
        real_read, real_open, real_hash = TensorFile.read_into, models_mod.open_checkpoint, hasher_mod.file_sha256

        def read_into(this, key, out):
            self.reads += 1
            return real_read(this, key, out)

        def open_ckpt(path):
            self.opens += 1
            return real_open(path)

        def sha(path, *a, **k):
            self.hashes += 1
            return real_hash(path, *a, **k)

        monkeypatch.setattr(TensorFile, "read_into", read_into)
        monkeypatch.setattr(models_mod, "open_checkpoint", open_ckpt)
        monkeypatch.setattr(hasher_mod, "file_sha256", sha)
        monkeypatch.setattr(file_hash_mod, "file_sha256", sha)


def test_render_from_the_pack_is_identical_and_adopts_the_buffers(model, tmp_path):
    cache = tmp_path / "packs"
    plain = Engine(open_model(model), "cpu")
    first = Engine(open_model(model), "cpu", model_cache=cache)
    r0, r1 = plain.generate(small_request(**REQ)), first.generate(small_request(**REQ))
    published()
    the_pack(cache)
    plan = Plan(GiB, text="resident", unet="resident", vae="resident")
    again = Engine(open_model(model), "cpu", model_cache=cache, plan=plan)
    assert again.models._store.pack is not None  # read from the pack
    r2 = again.generate(small_request(**REQ))
    assert same_weights(plain.models, again.models)
    for r in (r1, r2):
        assert np.array_equal(np.asarray(r0.image), np.asarray(r.image))
    # The placement adopted the buffers the pack was read into: no second copy.
    for stage in STAGES:
        hosts = again.models.unit_hosts(stage)
        units = again.placement.models[stage]
        assert len(hosts) == len(units) and len(units) >= 1
        assert all(h.data_ptr() == u.host.data_ptr() for h, u in zip(hosts, units))
    assert len(again.placement.models["unet"]) == len(list(again.models.module("unet").units()))


def test_converted_weights_equal_torch_conversion(model, tmp_path):
    """fp32 file -> fp16 units, through the pack and not: each tensor is torch's .to(fp16)."""
    from safetensors.torch import load_file

    ref = load_file(str(model / "model.safetensors"))
    cache = tmp_path / "packs"
    built = load(model, cache, torch.float16)
    packed_again = load(model, cache, torch.float16)
    assert packed_again._store.pack is not None
    unet = dict(packed_again.module("unet").state_dict())
    for name, t in unet.items():
        assert torch.equal(t, ref["model.diffusion_model." + name].to(torch.float16)), name
    assert same_weights(built, packed_again)


def test_second_load_neither_reads_nor_hashes_the_checkpoint(model, tmp_path, monkeypatch):
    cache = tmp_path / "packs"
    first = load(model, cache)
    digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert first.sha256 == digest
    published()
    assert _header(the_pack(cache))["sha256"] == digest
    spies = Spies(monkeypatch)
    second = load(model, cache)
    assert second.sha256 == digest and second.model_hash == digest[:10]
    assert (spies.reads, spies.opens, spies.hashes) == (0, 0, 0)
    assert same_weights(first, second)


def test_from_cache_says_whether_a_model_will_be_read_from_the_pack(model, tmp_path):
    """What the engine's first render decides its warm-up by (engine/unet_stage.py)."""
    cache = tmp_path / "packs"
    assert not Models(open_model(model), torch.float32, model_cache=cache).from_cache("unet")  # no pack yet
    load(model, cache)
    again = Models(open_model(model), torch.float32, model_cache=cache)
    assert again.from_cache("unet") and again.from_cache("vae")
    again.module("unet")
    assert not again.from_cache("unet") and again.from_cache("vae")  # built: nothing left to read
    assert not Models(open_model(model), torch.float32).from_cache("unet")  # no cache folder


@pytest.mark.parametrize("one_pass", [False, True], ids=["model by model", "one pass"])
def test_models_are_in_use_before_their_pack_is_written_and_change_only_after(model, tmp_path, monkeypatch,
                                                                               one_pass):
    """The model cache's writes only read a model's buffers: every model is handed over while none
    of them is written (a first use's text encoder no longer waits behind the U-Net's writes); a
    change in place (a LoRA merge: ``before_change``) waits for them, so the pack holds the
    weights as converted."""
    if one_pass:
        monkeypatch.setattr(models_mod, "SINGLE_PASS_BYTES", 0)
    gate, real = threading.Event(), os.pwrite

    def held(fd, data, offset):
        assert gate.wait(60)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", held)
    cache = tmp_path / "packs"
    m = Models(open_model(model), torch.float32, model_cache=cache)
    for stage in STAGES:
        m.module(stage)
    assert m._store.writer is not None and not m._store.writer.done  # nothing written yet
    change = threading.Thread(target=m.before_change, args=("unet",))
    change.start()
    change.join(0.3)
    assert change.is_alive()  # waiting for the U-Net's writes
    gate.set()
    change.join(60)
    assert not change.is_alive() and "unet" in m._store.writer.done
    published()
    the_pack(cache)
    assert same_weights(m, load(model, cache))
    assert load(model, cache)._store.pack is not None


def hold_file_hashes(monkeypatch) -> threading.Event:
    """Every whole-file sha256 on a hashing thread waits until the event returned is set."""
    gate = threading.Event()
    real = hasher_mod.file_sha256

    def held(path, *a, **k):
        assert gate.wait(60)
        return real(path, *a, **k)

    monkeypatch.setattr(hasher_mod, "file_sha256", held)
    return gate


def test_first_load_hashes_on_a_thread(model, tmp_path, monkeypatch):
    """Models are built while the hash is still being computed; sha256 waits for it."""
    gate = hold_file_hashes(monkeypatch)
    memo = tmp_path / "hashes.json"
    m = Models(open_model(model), torch.float32, hash_memo=memo)
    for stage in STAGES:
        m.module(stage)  # would deadlock if loading waited for the hash
    assert not m._hash.done()
    gate.set()
    digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert m.sha256 == digest
    assert json.loads(memo.read_text())[str((model / "model.safetensors").resolve())]["sha256"] == digest


class _StillHashing:
    """A whole-file hash that is never done before it is asked for."""

    def done(self) -> bool:
        return False

    def result(self) -> str:
        return "ab" * 32


def test_waiting_for_the_hash_builds_only_models_never_built(model, monkeypatch):
    """While the hash is awaited, the models not built yet are loaded meanwhile; one built and
    let go (a one-shot command's text encoder after its stage) is not built again (it was: 235
    MiB more peak RSS on a full-size first use)."""
    monkeypatch.setattr(models_mod, "PREFETCH_WHILE_HASHING", 0)
    fresh = Models(open_model(model), torch.float32)
    fresh._hash = _StillHashing()
    assert fresh.sha256 == "ab" * 32
    assert all(fresh.built(s) for s in STAGES)  # none built yet: all loaded while waiting

    m = Models(open_model(model), torch.float32)
    for stage in STAGES:
        m.module(stage)
    m.drop("text")
    calls = []
    real = m.factories["text"]
    m.factories["text"] = lambda: calls.append(1) or real()
    m._hash = _StillHashing()
    assert m.sha256 == "ab" * 32
    assert calls == [] and not m.built("text")


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _read_header(path: Path) -> tuple[dict, int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pack_format.read_header(fd)
    finally:
        os.close(fd)


def _header(path: Path) -> dict:
    return _read_header(path)[0]


def _payload_start(path: Path) -> int:
    return _read_header(path)[1]


def test_a_change_waits_for_the_writes_not_for_the_files_sha256(model, tmp_path, monkeypatch):
    """Publishing a pack waits for the checkpoint's sha256 (a whole-file hash, seconds on a first
    use); a LoRA merge (``before_change``) waits for the writes alone."""
    gate = hold_file_hashes(monkeypatch)
    cache = tmp_path / "packs"
    m = Models(open_model(model), torch.float32, model_cache=cache)
    for stage in STAGES:
        m.module(stage)
    changes = threading.Thread(target=lambda: [m.before_change(s) for s in STAGES])
    changes.start()
    changes.join(30)
    assert not changes.is_alive() and m._store.writer.complete()
    assert pack_format.pack_files(cache) == []  # still waiting for the hash
    gate.set()
    published()
    the_pack(cache)


@pytest.mark.parametrize("damage", ["truncated", "payload byte", "unet byte", "header byte", "zero length"])
def test_damaged_pack_is_detected_and_rebuilt(model, tmp_path, monkeypatch, damage):
    cache = tmp_path / "packs"
    good = load(model, cache)
    pack = the_pack(cache)
    size = pack.stat().st_size
    if damage == "truncated":
        os.truncate(pack, size - 1)
    elif damage == "zero length":
        os.truncate(pack, 0)
    elif damage == "payload byte":
        _flip(pack, _payload_start(pack) + 5)
    elif damage == "unet byte":  # the text encoder reads fine, the U-Net does not
        header, start = _read_header(pack)
        _flip(pack, start + header["models"]["unet"]["offset"] + header["models"]["unet"]["nbytes"] - 7)
    else:
        fd = os.open(pack, os.O_RDONLY)
        try:
            header, start = pack_format.read_header(fd)
            at = start + header["payload"]  # the header follows the payload
        finally:
            os.close(fd)
        _flip(pack, at + 10)
    spies = Spies(monkeypatch)
    second = load(model, cache)
    assert spies.reads > 0  # the damage was noticed: the weights came from the checkpoint
    assert same_weights(good, second)
    # Rebuilt (in this run, or the next when a model was already read from the damaged pack).
    third = load(model, cache)
    fourth = load(model, cache)
    assert fourth._store.pack is not None
    assert same_weights(good, third) and same_weights(good, fourth)


def test_changed_checkpoint_never_uses_the_old_pack(model, tmp_path):
    cache = tmp_path / "packs"
    ckpt = model / "model.safetensors"
    old = load(model, cache)
    st = ckpt.stat()
    time.sleep(0.02)  # a ctime the kernel can tell apart
    # New content in place: same path, same size, same inode; the mtime put back.
    entries = TensorFile(ckpt).entries
    key = "model.diffusion_model.out.2.bias"
    e = entries[key]
    with open(ckpt, "r+b") as f:
        f.seek(e.start)
        f.write(np.full(e.nbytes // 4, 7.0, dtype=np.float32).tobytes())
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ckpt.stat().st_size == st.st_size and ckpt.stat().st_mtime_ns == st.st_mtime_ns
    new = load(model, cache)
    assert torch.equal(new.module("unet").state_dict()["out.2.bias"], torch.full_like(old.module("unet").out[2].bias, 7.0))
    assert not torch.equal(new.module("unet").out[2].bias, old.module("unet").out[2].bias)
    again = load(model, cache)  # the pack now holds the new content
    assert again._store.pack is not None
    assert torch.equal(again.module("unet").out[2].bias, new.module("unet").out[2].bias)
    assert again.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_unusable_cache_folder_is_no_error(model, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    engine = Engine(open_model(model), "cpu", model_cache=blocker / "packs")
    engine.generate(small_request(**REQ))
    published()
    assert blocker.read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        m = load(model, ro)
        assert same_weights(m, load(model, None))
    finally:
        ro.chmod(0o700)


def test_at_most_two_packs_are_kept(model, tmp_path):
    cache = tmp_path / "packs"
    for i in range(3):
        copy = Path(shutil.copytree(model, tmp_path / f"copy{i}"))
        load(copy, cache)
        time.sleep(0.01)
    files = pack_format.pack_files(cache)
    assert len(files) == pack_format.KEEP == 2
    assert not pack_format.temp_files(cache)


def test_safetensors_weights_are_read_without_safe_open_or_mmap(model, monkeypatch):
    """The weights come through positioned reads: safe_open only names and shapes the tensors,
    and nothing maps the file (its 4 GB would count in the process's memory)."""
    import mmap

    import safetensors

    real = safetensors.safe_open
    calls: list[str] = []

    class Handle:
        def __init__(self, *a, **k):
            self._h = real(*a, **k)

        def keys(self):
            return self._h.keys()

        def metadata(self):
            return self._h.metadata()

        def get_slice(self, key):
            inner = self._h.get_slice(key)

            class Slice:
                def get_shape(self):
                    return inner.get_shape()

                def __getitem__(self, item):
                    calls.append(f"slice {key}")
                    return inner[item]

            return Slice()

        def get_tensor(self, key):
            calls.append(key)
            return self._h.get_tensor(key)

    def no_mmap(*a, **k):
        calls.append("mmap")
        raise AssertionError("mmap")

    monkeypatch.setattr(safetensors, "safe_open", Handle)
    monkeypatch.setattr(mmap, "mmap", no_mmap)
    m = load(model, None, torch.float16)
    assert calls == []
    assert m.module("unet").out[2].bias.dtype == torch.float16


def test_cache_command_sees_the_packs(model, run_cli):
    from sdterm import paths

    load(model, paths.model_cache_dir())
    code, out, _ = run_cli("cache", "stats")
    assert code == 0 and "1 pack(s)" in out
    stats = json.loads(run_cli("cache", "--json")[1])["model_packs"]
    assert stats["count"] == 1 and stats["bytes"] == the_pack(paths.model_cache_dir()).stat().st_size
    code, out, _ = run_cli("cache", "prune")
    assert code == 0 and "removed 0 model pack(s)" in out and pack_format.pack_files(paths.model_cache_dir())
    ckpt = model / "model.safetensors"
    time.sleep(0.02)
    os.utime(ckpt)  # the checkpoint changed: its pack is stale
    code, out, _ = run_cli("cache", "prune")
    assert "removed 1 model pack(s)" in out and not pack_format.pack_files(paths.model_cache_dir())
    load(model, paths.model_cache_dir())
    code, out, _ = run_cli("cache", "clear")
    assert code == 0 and "removed 1 model pack(s)" in out and not pack_format.pack_files(paths.model_cache_dir())


def test_pinned_buffers_are_registered_at_their_exact_size_and_released_last(monkeypatch):
    """host_memory.pinned_exact: page-aligned, exactly nbytes registered with CUDA (no power-of-two
    rounding), unregistered only once the last view of it is gone. A fake CUDA runtime stands in."""
    import gc

    from sdterm.engine.memory import host_memory

    calls: list[tuple] = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(host_memory, "_cudart", lambda: FakeCudart())
    n = 3 * 2**20 + 100
    buf = host_memory.host_buffer(n, pin=True)
    assert buf.numel() == n and buf.dtype == torch.uint8
    assert calls == [("register", buf.data_ptr(), n)] and buf.data_ptr() % host_memory.PAGE == 0
    view = buf[4096:8192]
    del buf
    gc.collect()
    assert len(calls) == 1  # a view still uses the memory
    view.fill_(1)
    del view
    gc.collect()
    assert calls[-1][0] == "unregister" and calls[-1][1] == calls[0][1]

    class Refusing(FakeCudart):
        def cudaHostRegister(self, ptr, size, flags):
            return 2

    monkeypatch.setattr(host_memory, "_cudart", lambda: Refusing())
    assert host_memory.pinned_exact(1000) is None


def test_a_pack_without_the_text_encoder_is_published_at_exit_and_completed_from_the_file(model, tmp_path,
                                                                                           monkeypatch):
    """The prompt cache had every chunk: the text encoder was never built. At exit the pack is
    published with the U-Net and the VAE; the next start reads those from it and only the text
    encoder from the checkpoint. The VAE's last writes, slow here, are waited for: a model handed
    to its user is in the pack even when its writes end after the exit handler began."""
    import weakref

    from sdterm.engine.loading import packed
    from sdterm.engine.loading.store import _publish_partial

    real = packed.PackWriter.stage_done

    def slow_vae(self, stage):
        if stage == "vae":
            time.sleep(0.5)
        real(self, stage)

    monkeypatch.setattr(packed.PackWriter, "stage_done", slow_vae)
    cache = tmp_path / "packs"
    first = Models(open_model(model), torch.float32, model_cache=cache)
    first.module("unet")
    first.before_change("unet")  # the U-Net's writes are done (what the exit handler asks for)
    first.module("vae")
    assert not pack_format.pack_files(cache)  # not complete: nothing published yet
    _publish_partial(weakref.ref(first._store.writer))  # what atexit does
    assert set(_header(the_pack(cache))["models"]) == {"unet", "vae"}
    spies = Spies(monkeypatch)
    second = Models(open_model(model), torch.float32, model_cache=cache)
    second.module("unet")
    second.module("vae")
    assert spies.reads == 0
    second.module("text")
    assert spies.reads > 0
    assert same_weights(second, load(model, None))


def test_pinned_models_are_filled_then_locked_at_their_exact_size(model, tmp_path, monkeypatch):
    """With ``pin`` (a GPU), each model's buffer is read or converted first and page-locked after
    (CUDA's start-up overlaps the reading), once, at the model's exact size; pack or not."""
    from sdterm.engine.memory import host_memory

    registered: list[tuple[int, int]] = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, size, flags):
            registered.append((ptr, size))
            return 0

        def cudaHostUnregister(self, ptr):
            return 0

    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.setattr(host_memory, "_cudart", lambda: FakeCudart())
    cache = tmp_path / "packs"
    for run in range(2):  # from the checkpoint (and packed), then from the pack
        registered.clear()
        m = load(model, cache, pin=True)
        assert (m._store.pack is not None) == (run == 1)
        assert len(registered) == len(STAGES)
        for stage in STAGES:
            hosts = m.unit_hosts(stage)
            assert (hosts[0].data_ptr(), sum(h.numel() for h in hosts)) in registered
        assert same_weights(m, load(model, None))
