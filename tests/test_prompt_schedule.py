"""Prompt scheduling and textual-inversion embeddings through the engine, against an independent
computation with transformers' CLIPTextModel on the demo text encoder.

The rules the expectations are written from (A1111, not sdterm's code):

* ``get_learned_conditioning`` encodes a prompt's schedule texts as one batch: emphasis restores
  the mean over the whole batch per chunk index, entries with fewer chunks are padded with the
  empty chunk (and keep it).
* ``CFGDenoiser`` counts its calls from 0; call ``n`` uses the first schedule entry whose
  end_at_step is >= n. Schedules are computed over the sampler's ``total_steps``: twice the steps
  for a second-order sampler (Heun makes 2 calls a step, 1 on the last).
* An embedding's vectors replace the token embeddings of its trigger word's positions (diffusers
  does the same by adding tokens to the vocabulary: the reference here does it that way).
"""

from __future__ import annotations

import re

import pytest
import torch

from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.events import Notice
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.prompt.conditioning import CHUNK_LENGTH, chunk_prompt

from .conftest import oom_on_call, small_request
from .test_conditioning import WordTokenizer, contexts

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 32  # the demo text encoder's hidden size


# ---- the reference --------------------------------------------------------------------------

def ref_unweighted(encoder, frags: list[tuple[str, float]], vectors: dict[str, torch.Tensor] | None = None):
    """One chunk's unweighted output (fp16, as cached) and its multipliers. ``vectors``: trigger
    word -> (n, dim) embedding, added to a copy of the model as new vocabulary entries."""
    model, tok = encoder
    ids, mults = [], []
    extra: list[torch.Tensor] = []
    vocab = len(tok.get_vocab())
    for text, w in frags:
        if vectors and text in vectors:
            v = vectors[text]
            new = list(range(vocab + sum(len(e) for e in extra), vocab + sum(len(e) for e in extra) + len(v)))
            extra.append(v)
            ids += new
            mults += [w] * len(v)
            continue
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        mults += [w] * len(t)
    assert len(ids) <= CHUNK_LENGTH
    ids = [tok.bos_token_id] + ids + [tok.eos_token_id] * (76 - len(ids))
    mults = [1.0] + mults + [1.0] * (76 - len(mults))
    inner = getattr(model, "text_model", model)
    emb = inner.embeddings.token_embedding
    original = emb.weight.data
    if extra:
        emb.weight.data = torch.cat([original, *extra])
    try:
        with torch.no_grad():
            z = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    finally:
        emb.weight.data = original
    return z.half(), mults


def ref_batch(entries) -> list[torch.Tensor]:
    """A1111's emphasis over a batch of (z, multipliers) chunks at one chunk index."""
    z = torch.stack([e[0] for e in entries])
    m = torch.tensor([e[1] for e in entries], dtype=torch.float32)
    original = z.mean()
    z = z * m[:, :, None]
    z = z * (original / z.mean())
    return [z[i][None] for i in range(len(entries))]


def cond_contexts(engine, monkeypatch, **kw) -> list[torch.Tensor]:
    """The conditional context of each U-Net call (cfg 1: the only pass)."""
    return contexts(engine, monkeypatch, cfg=1.0, **kw)


def which(ctxs, refs) -> list[int]:
    """For each call's context, the index of the reference it equals (-1: none)."""
    out = []
    for c in ctxs:
        hit = [i for i, r in enumerate(refs) if c.shape == r.shape and torch.allclose(c, r, rtol=1e-6, atol=1e-6)]
        out.append(hit[0] if len(hit) == 1 else -1)
    return out


@pytest.fixture(scope="module")
def engine(demo_model):
    return Engine(open_model(demo_model), "cpu")


# ---- scheduling -----------------------------------------------------------------------------

def test_a_schedule_switches_after_its_step_and_shares_one_emphasis_batch(engine, reference_encoder, monkeypatch):
    # [(red:1.5):blue:2] over 4 DDIM steps: A1111's schedule is [(2, "a (red:1.5) fox"), (4, "a blue fox")];
    # calls 0, 1, 2 take the first (0-based counter <= 2), call 3 the second.
    ctxs = cond_contexts(engine, monkeypatch, prompt="a [(red:1.5):blue:2] fox", steps=4)
    first = ref_unweighted(reference_encoder, [("a ", 1.0), ("red", 1.5), (" fox", 1.0)])
    second = ref_unweighted(reference_encoder, [("a blue fox", 1.0)])
    refs = ref_batch([first, second])
    assert which(ctxs, refs) == [0, 0, 0, 1]
    # The batch's mean is what was restored, not each entry's own: the test can tell them apart.
    alone = ref_batch([first])[0]
    assert not torch.allclose(alone, refs[0], rtol=1e-6, atol=1e-6)


def test_a_second_order_sampler_schedules_over_twice_the_steps_and_counts_calls(engine, reference_encoder, monkeypatch):
    # Heun, 3 steps: total_steps 6, "[red:blue:0.5]" ends at int(0.5 * 6) = 3; Heun calls 2, 2, 1
    # times: calls 0..3 are red, call 4 blue.
    ctxs = cond_contexts(engine, monkeypatch, prompt="[red:blue:0.5] fox", steps=3, sampler="Heun")
    refs = ref_batch([ref_unweighted(reference_encoder, [("red fox", 1.0)]),
                      ref_unweighted(reference_encoder, [("blue fox", 1.0)])])
    assert which(ctxs, refs) == [0, 0, 0, 0, 1]


def test_alternation_follows_a1111s_counter(engine, reference_encoder, monkeypatch):
    # [red|blue] over 4 steps: entries end at 1, 2, 3, 4 (red, blue, red, blue); the 0-based call
    # counter takes entry 1 for calls 0 and 1, then entry 2, entry 3.
    ctxs = cond_contexts(engine, monkeypatch, prompt="[red|blue] fox", steps=4)
    red = ref_unweighted(reference_encoder, [("red fox", 1.0)])
    blue = ref_unweighted(reference_encoder, [("blue fox", 1.0)])
    refs = ref_batch([red, blue, red, blue])
    assert which(ctxs, refs[:2]) == [0, 0, 1, 0]


def test_the_negative_prompt_is_scheduled_too(engine, reference_encoder, monkeypatch):
    seen = contexts(engine, monkeypatch, prompt="a fox", negative="[blurry:dark:1]", steps=3, cfg=7.5)
    blurry = ref_batch([ref_unweighted(reference_encoder, [("blurry", 1.0)]),
                        ref_unweighted(reference_encoder, [("dark", 1.0)])])
    assert which([c[:1] for c in seen], blurry) == [0, 0, 1]  # uncond comes first in the batch of two


def test_entries_with_fewer_chunks_keep_the_empty_filler_chunk(engine, reference_encoder, monkeypatch):
    ctxs = cond_contexts(engine, monkeypatch, prompt="[cat BREAK dog:cat:1] fox", steps=3)
    assert [tuple(c.shape) for c in ctxs] == [(1, 154, WIDTH)] * 3
    first = [ref_unweighted(reference_encoder, [("cat", 1.0)]), ref_unweighted(reference_encoder, [("dog fox", 1.0)])]
    second = [ref_unweighted(reference_encoder, [("cat fox", 1.0)]), ref_unweighted(reference_encoder, [("", 1.0)])]
    by_index = [ref_batch([first[i], second[i]]) for i in range(2)]
    entry = [torch.cat([by_index[0][k], by_index[1][k]], dim=1) for k in range(2)]
    assert which(ctxs, entry) == [0, 0, 1]


def test_a_retry_resumes_the_call_count(demo_model):
    from sdterm.engine.memory.planner import Plan

    staged = Plan(2**30, prefetch_unet=True, prefetch_vae=True)
    req = small_request(prompt="[red:blue:2] fox", steps=4, negative="blurry")
    clean = Engine(open_model(demo_model), "cpu", plan=staged).generate(req)
    engine = Engine(open_model(demo_model), "cpu", plan=staged)
    unet = engine.models.module("unet")
    unet.forward = oom_on_call(unet.forward, 3)  # the third call fails; the retry makes it again
    notices: list[str] = []
    r = engine.generate(req, emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert any("retrying" in n for n in notices), notices
    assert torch.equal(r.latents, clean.latents)


def test_a_new_schedule_of_cached_texts_never_runs_the_encoder(demo_model, tmp_path):
    def fresh():
        return Engine(open_model(demo_model), "cpu", cache=EmbeddingCache(tmp_path))

    fresh().generate(small_request(prompt="a red fox"))
    fresh().generate(small_request(prompt="a blue fox"))
    engine = fresh()

    def forbidden():
        raise AssertionError("the text encoder was built though every chunk was cached")

    engine.models.factories["text"] = forbidden
    r = engine.generate(small_request(prompt="a [red:blue:2] fox"))
    assert r.stages[0].cache == "hit"
    schedule = r.prompts["prompt"]["schedule"]
    assert [(s["until_step"], s["text"], len(s["chunks"])) for s in schedule] == [(2, "a red fox", 1), (3, "a blue fox", 1)]


def test_and_is_rendered_as_text_with_one_notice(engine):
    notices: list[str] = []
    r = engine.generate(small_request(prompt="a fox AND a cat"), emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    assert len([n for n in notices if "AND" in n]) == 1
    plain = engine.generate(small_request(prompt="a fox and a cat"))  # CLIP lowercases: the same words
    assert r.image.tobytes() == plain.image.tobytes()


# ---- textual inversion: chunking --------------------------------------------------------------

class FakeEmbedding:
    def __init__(self, name: str, n: int):
        self.name, self.n_vectors, self.sha256 = name, n, f"{name}-hash"


class FakeDB:
    """Trigger words of one word each (the WordTokenizer's ids)."""

    def __init__(self, tok: WordTokenizer, **embs: int):
        self.by_id = {tok.ids(name)[0]: FakeEmbedding(name, n) for name, n in embs.items()}

    def find(self, ids, i, tokenize):
        emb = self.by_id.get(ids[i])
        return (emb, 1) if emb is not None else None


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_an_embedding_that_does_not_fit_starts_the_next_chunk():
    tok = WordTokenizer()
    db = FakeDB(tok, emb=3)
    out = chunk_prompt(words(73) + " emb after", tok, parse=lambda t: [[t, 1.0]], embeddings=db)
    first, second = out.chunks
    assert first.length == 73 and not first.fixes
    assert [(f.position, f.embedding.name) for f in second.fixes] == [(1, "emb")]
    assert second.ids[1:4] == (0, 0, 0) and second.length == 4
    assert out.n_tokens == 75 + 4


def test_an_embedding_that_fits_stays_and_takes_the_weight():
    tok = WordTokenizer()
    db = FakeDB(tok, emb=3)
    out = chunk_prompt("a (emb:1.3) b", tok, embeddings=db)
    (chunk,) = out.chunks
    assert [(f.position, f.embedding.name) for f in chunk.fixes] == [(2, "emb")]
    assert chunk.multipliers[:6] == (1.0, 1.0, 1.3, 1.3, 1.3, 1.0)
    assert chunk.length == 5


def test_the_comma_backtrack_moves_an_embedding_with_its_words():
    tok = WordTokenizer()
    db = FakeDB(tok, emb=2)
    # 70 words, a comma (71), "emb" (2 vectors: 73), two words (75): the 76th moves everything
    # after the comma, the embedding included, to the next chunk.
    out = chunk_prompt(words(70) + " , emb x y z", tok, parse=lambda t: [[t, 1.0]], embeddings=db)
    first, second = out.chunks
    assert first.length == 71 and not first.fixes
    assert [(f.position, f.embedding.name) for f in second.fixes] == [(1, "emb")]
    assert second.ids[1:3] == (0, 0) and second.length == 5


def test_the_cache_key_names_the_embedding():
    tok = WordTokenizer()
    a = chunk_prompt("x emb", tok, embeddings=FakeDB(tok, emb=2)).chunks[0]
    b = chunk_prompt("x emb", tok).chunks[0]
    assert a.key != b.key and a.fix_signature == "2:emb-hash" and b.fix_signature == ""


# ---- textual inversion: numbers and pixels ------------------------------------------------------

def write_embedding(folder, name: str, vectors: torch.Tensor):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": vectors}, "name": name}, folder / f"{name}.pt")


@pytest.fixture()
def foxy(tmp_path):
    vectors = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(7)) * 0.5
    write_embedding(tmp_path / "emb", "foxy", vectors)
    return tmp_path / "emb", vectors


def test_embedding_conditioning_equals_clip_with_the_vectors_as_new_tokens(demo_model, reference_encoder, foxy,
                                                                            monkeypatch):
    folder, vectors = foxy
    engine = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder])
    (ctx,) = cond_contexts(engine, monkeypatch, prompt="a (foxy:1.2) in snow", steps=1)
    want = ref_batch([ref_unweighted(reference_encoder, [("a ", 1.0), ("foxy", 1.2), (" in snow", 1.0)],
                                     {"foxy": vectors})])[0]
    torch.testing.assert_close(ctx, want, rtol=1e-6, atol=1e-6)
    # Without the folder the word is three letters' tokens: another conditioning.
    (plain,) = cond_contexts(Engine(open_model(demo_model), "cpu"), monkeypatch, prompt="a (foxy:1.2) in snow", steps=1)
    assert not torch.allclose(plain, want, atol=1e-3)


def test_an_embedding_changes_the_image_and_is_named_in_the_result(demo_model, foxy):
    folder, _ = foxy
    with_it = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder]).generate(small_request(prompt="foxy"))
    without = Engine(open_model(demo_model), "cpu").generate(small_request(prompt="foxy"))
    assert with_it.image.tobytes() != without.image.tobytes()
    import hashlib

    digest = hashlib.sha256((folder / "foxy.pt").read_bytes()).hexdigest()[:12]
    assert with_it.infotext_extra == {"TI hashes": f"foxy: {digest}"}
    assert with_it.prompts["prompt"]["embeddings"][0]["hash"] == digest
    assert without.infotext_extra == {}


def test_ti_hashes_list_the_prompts_then_the_negatives_and_not_the_negative_at_cfg_1(demo_model, tmp_path):
    folder = tmp_path / "emb"
    write_embedding(folder, "foxy", torch.ones(1, WIDTH))
    write_embedding(folder, "blurx", torch.full((2, WIDTH), 0.5))
    engine = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder])
    r = engine.generate(small_request(prompt="foxy", negative="blurx"))
    names = re.findall(r"(\w+): [0-9a-f]{12}", r.infotext_extra["TI hashes"])
    assert names == ["foxy", "blurx"]
    r1 = engine.generate(small_request(prompt="foxy", negative="blurx", cfg=1.0))
    assert re.findall(r"(\w+): [0-9a-f]{12}", r1.infotext_extra["TI hashes"]) == ["foxy"]


def test_a_bad_file_is_named_once_and_the_render_goes_on(demo_model, foxy):
    folder, _ = foxy
    (folder / "broken.pt").write_bytes(b"not a pickle at all")
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}}, folder / "wide.pt")
    engine = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder])
    notices: list[str] = []
    collect = lambda e: isinstance(e, Notice) and notices.append(e.message)  # noqa: E731
    r = engine.generate(small_request(prompt="foxy broken wide"), emit=collect)
    bad = [n for n in notices if "embedding not used" in n]
    assert len(bad) == 2 and any("broken.pt" in n for n in bad) and any("wide.pt" in n and "768" in n for n in bad)
    assert all("\n" not in n for n in bad)
    assert [e["name"] for e in r.prompts["prompt"]["embeddings"]] == ["foxy"]
    engine.generate(small_request(prompt="foxy"), emit=collect)
    assert len([n for n in notices if "embedding not used" in n]) == 2  # once per engine


def test_a_changed_embedding_file_is_a_cache_miss_and_the_same_file_a_hit(demo_model, tmp_path):
    folder = tmp_path / "emb"
    write_embedding(folder, "foxy", torch.ones(2, WIDTH))

    def render():
        engine = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder], cache=EmbeddingCache(tmp_path / "c"))
        return engine.generate(small_request(prompt="a foxy"))

    first, again = render(), render()
    assert (first.stages[0].cache_texts["prompt"], again.stages[0].cache) == ("miss", "hit")
    assert first.image.tobytes() == again.image.tobytes()
    write_embedding(folder, "foxy", torch.full((2, WIDTH), -1.0))
    changed = render()
    assert changed.stages[0].cache_texts["prompt"] == "miss" and changed.image.tobytes() != first.image.tobytes()


def test_a_file_dropped_into_the_folder_is_used_by_the_next_render(demo_model, tmp_path):
    folder = tmp_path / "emb"
    folder.mkdir()
    engine = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder])
    before = engine.generate(small_request(prompt="foxy"))
    write_embedding(folder, "foxy", torch.ones(2, WIDTH))
    after = engine.generate(small_request(prompt="foxy"))
    assert before.prompts["prompt"]["embeddings"] == [] and after.prompts["prompt"]["embeddings"]
    assert before.image.tobytes() != after.image.tobytes()


def test_explain_reports_chunks_weights_and_embeddings(demo_model, foxy):
    folder, _ = foxy
    engine = Engine(open_model(demo_model), "cpu", embedding_dirs=[folder])
    report = engine.explain("a (red:1.3) foxy BREAK castle [x|y]", steps=10)
    assert report.embeddings == ("foxy",) and report.variants == 2 and not report.has_and
    first, second = report.chunks
    assert [(p.text.strip(), round(p.weight, 4), p.embedding) for p in first] == [
        ("a", 1.0, None), ("red", 1.3, None), ("foxy", 1.0, "foxy")]
    assert sum(p.tokens for p in first) == 1 + 1 + 3
    assert "castle" in "".join(p.text for p in second)
    assert engine.explain("a AND b").has_and
    # <lora:> tags are not what CLIP sees: not counted
    assert engine.explain("a <lora:detail:0.5> castle").tokens == engine.explain("a castle").tokens
