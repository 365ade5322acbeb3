"""The prompt-embedding cache: keys, hits, repair, concurrency, eviction, and what a hit costs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdterm.engine.embedding_cache import EmbeddingCache, cache_key
from sdterm.engine.pipeline import Engine, open_model

from .conftest import small_request

SMALL = ["--width", "64", "--height", "64", "--steps", "3"]


def _engine(model, cache_dir: Path) -> Engine:
    return Engine(open_model(model), "cpu", cache=EmbeddingCache(cache_dir))


def test_generate_twice_miss_then_hit_identical_pixels(demo_model, tmp_path, run_cli):
    results = []
    for _ in range(2):
        code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 5, "--json",
                                 "--outdir", tmp_path, *SMALL)
        assert code == 0, err
        results.append(json.loads(out))
    first, second = results
    assert first["cache"] == {"prompt": "miss", "negative": "miss"}
    assert second["cache"] == {"prompt": "hit", "negative": "hit"}
    assert second["stages"][0]["cache"] == "hit" and second["stages"][0]["skipped"] is True
    a, b = (np.asarray(Image.open(r["path"])) for r in results)
    assert np.array_equal(a, b)


def test_hit_never_builds_or_loads_the_encoder(demo_model, tmp_path):
    _engine(demo_model, tmp_path).generate(small_request())
    engine = _engine(demo_model, tmp_path)  # a fresh process's engine: nothing built yet

    def forbidden():
        raise AssertionError("the text encoder was built on a cache hit")

    engine.models.factories["text"] = forbidden
    # Every way to the weights (built on the host, or registered with the placement and uploaded)
    # asks Engine.module for them: on a hit the text stage must never ask.
    asked: list[str] = []
    module = engine.models.module

    def watched(stage: str):
        asked.append(stage)
        return module(stage)

    engine.models.module = watched
    result = engine.generate(small_request())
    text = result.stages[0]
    assert text.cache == "hit" and text.skipped
    assert "text" not in asked and asked, asked  # the U-Net and the VAE were asked for: the spy works
    assert "text" not in engine.models._modules


def test_hit_and_miss_and_no_cache_give_identical_pixels(demo_model, tmp_path):
    req = small_request(prompt="portrait of an old man", negative="blurry", seed=11)
    miss = _engine(demo_model, tmp_path).generate(req)
    hit = _engine(demo_model, tmp_path).generate(req)
    plain = Engine(open_model(demo_model), "cpu").generate(req)
    assert miss.stages[0].cache == "miss" and hit.stages[0].cache == "hit"
    assert miss.image.tobytes() == hit.image.tobytes() == plain.image.tobytes()


def test_another_models_weights_miss(demo_model, tmp_path):
    from sdterm.engine.loading.demo import write_demo_model

    other = write_demo_model(tmp_path / "other", seed=1)
    _engine(demo_model, tmp_path / "c").generate(small_request())
    r = _engine(other, tmp_path / "c").generate(small_request())
    assert r.stages[0].cache == "miss"
    assert EmbeddingCache(tmp_path / "c").stats().entries == 4  # two texts x two models


def test_key_depends_on_every_part():
    def key(enc="enc", tok="tok", ids=(1, 23, 4), precision="cpu-float32", clip_skip=1):
        return cache_key(enc, tok, ids, precision=precision, clip_skip=clip_skip)

    base = key()
    variants = {key(enc="enc2"), key(tok="tok2"), key(ids=(1, 2, 34)), key(ids=(1, 23, 4, 5)),
                key(tok="tok1", ids=(23, 4)), key(precision="cuda-float16"), key(clip_skip=2)}
    assert len({base} | variants) == 8
    assert base == cache_key("enc", "tok", [1, 23, 4], precision="cpu-float32", clip_skip=1)


def test_corrupt_truncated_and_foreign_entries_are_misses_and_repaired(demo_model, tmp_path):
    engine = _engine(demo_model, tmp_path)
    engine.generate(small_request(negative="blurry"))
    cache = engine.cache
    files = sorted(p for p in tmp_path.rglob("*.safetensors"))
    assert len(files) == 2
    good = files[0].read_bytes()
    # truncated, garbage, and a valid safetensors file that belongs to another key
    files[0].write_bytes(good[: len(good) // 2])
    files[1].write_bytes(good)  # foreign: its metadata names the other key
    r = _engine(demo_model, tmp_path).generate(small_request(negative="blurry"))
    assert r.stages[0].cache == "miss" and r.stages[0].cache_texts == {"prompt": "miss", "negative": "miss"}
    r = _engine(demo_model, tmp_path).generate(small_request(negative="blurry"))
    assert r.stages[0].cache == "hit"
    files[0].write_bytes(b"\x00" * 3)
    assert cache.get(files[0].name.removesuffix(".safetensors")) is None
    assert not files[0].exists()


def _writer(folder: str, worker: int, n: int) -> None:
    cache = EmbeddingCache(Path(folder))
    for i in range(n):
        same = cache_key("enc", "tok", (i % 5,), precision="cpu-float32")
        own = cache_key("enc", "tok", (100 + worker, i), precision="cpu-float32")
        emb = torch.full((77, 32), float(i % 5))
        cache.put(same, emb, prompt=f"shared {i % 5}", model_hash="x")
        cache.put(own, torch.full((77, 32), float(worker)), prompt="own", model_hash="x")
        got = cache.get(same, 32)
        assert got is None or torch.equal(got, emb.half()), "torn or wrong entry read"


def test_concurrent_processes_leave_only_valid_entries(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    cache = EmbeddingCache(tmp_path)
    assert cache.stats().entries == 5 + 4 * 20
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    for i in range(5):
        got = cache.get(cache_key("enc", "tok", (i,), precision="cpu-float32"), 32)
        assert got is not None and torch.equal(got, torch.full((77, 32), float(i)).half())


def test_lru_eviction_order_under_the_cap(tmp_path):
    cache = EmbeddingCache(tmp_path, max_bytes=10**9)
    keys = [cache_key("e", "t", (i,), precision="cpu-float32") for i in range(4)]
    for i, k in enumerate(keys):
        cache.put(k, torch.zeros(77, 32), prompt=str(i), model_hash="x")
        os.utime(cache.path(k), (1000 + i, 1000 + i))  # put order = age order
    size = cache.path(keys[0]).stat().st_size
    assert cache.get(keys[0]) is not None  # key 0 used again: now the most recent
    cache.max_bytes = 2 * size
    assert cache.evict() == 2
    assert [cache.get(k, touch=False) is not None for k in keys] == [True, False, False, True]


def test_77_token_entry_is_at_most_120_kb(tmp_path):
    cache = EmbeddingCache(tmp_path)
    prompt = ", ".join(["a highly detailed painting"] * 18)  # about 75 tokens of text in the metadata
    key = cache_key("e", "t", range(77), precision="cpu-float32")
    path = cache.put(key, torch.randn(1, 77, 768), prompt=prompt, model_hash="0123456789")
    assert path.stat().st_size <= 120_000
    got = cache.get(key, 768)
    assert got.shape == (77, 768) and got.dtype == torch.float16


def test_unwritable_cache_renders_without_it(demo_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    notices = []
    from sdterm.engine.events import Notice

    r = _engine(demo_model, blocker / "cache").generate(
        small_request(), emit=lambda e: isinstance(e, Notice) and notices.append(e.message)
    )
    assert r.image.size == (64, 64)
    assert any("rendering without it" in n for n in notices)


def test_cache_cli_path_stats_prune_clear(demo_model, tmp_path, run_cli):
    code, out, _ = run_cli("cache", "path")
    folder = Path(out.strip())
    assert code == 0 and folder == Path(os.environ["SDTERM_CACHE_DIR"]) / "embeddings"
    run_cli("generate", "x", "--model", demo_model, "--seed", 1, "--outdir", tmp_path, *SMALL)
    code, out, _ = run_cli("cache", "stats", "--json")
    stats = json.loads(out)
    assert stats["entries"] == 2 and stats["bytes"] > 0 and stats["oldest"] and stats["newest"]
    stray = folder / "ab" / ".x.safetensors.1234.tmp"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"partial")
    os.utime(stray, (time.time() - 7200,) * 2)
    code, out, _ = run_cli("cache", "prune")
    assert code == 0 and not stray.exists()
    memos = Path(os.environ["SDTERM_CACHE_DIR"]) / "prompt-tokens"
    assert any(memos.glob("*.json")), "the render wrote no token memo"
    code, out, _ = run_cli("cache", "clear")
    assert "removed 2" in out and "prompt token memo" in out
    assert not any(memos.glob("*.json")), "cache clear left prompts on disk in the token memo"
    _, out, _ = run_cli("cache", "stats")
    assert "entries  0" in out


def test_no_cache_writes_no_prompt_anywhere_in_the_cache_folder(demo_model, tmp_path, run_cli):
    code, _, err = run_cli("generate", "a secret prompt", "--model", demo_model, "--seed", 1, "--outdir", tmp_path,
                           "--no-cache", *SMALL)
    assert code == 0, err
    cache_dir = Path(os.environ["SDTERM_CACHE_DIR"])
    for path in cache_dir.rglob("*"):
        if path.is_file():
            assert b"secret" not in path.read_bytes(), path


def test_cache_size_comes_from_user_config(tmp_path, run_cli):
    cfg = Path(os.environ["SDTERM_CONFIG_DIR"]) / "sdterm.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("cache:\n  max_size: 1M\n")
    code, out, _ = run_cli("cache", "stats", "--json")
    assert json.loads(out)["max_bytes"] == 2**20
    cfg.write_text("cache:\n  max_size: lots\n")
    code, out, err = run_cli("cache", "stats")
    assert code == 1 and "max_size" in err and len(err.strip().splitlines()) == 1
