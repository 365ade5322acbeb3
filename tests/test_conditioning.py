"""A1111's conditioning, text-encoder side: chunking, emphasis, clip skip, the per-chunk cache.

The numbers are checked against an independent computation with transformers' CLIPTextModel on
the demo text encoder (loaded from the checkpoint file by the test, weights applied and the
chunk's mean restored by the test itself). The prompt parser is ``sdterm.prompt_syntax``'s
(tested in tests/test_prompt_syntax.py).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from sdterm.engine.embedding_cache import EmbeddingCache
from sdterm.engine.pipeline import Engine, open_model
from sdterm.engine.prompt.conditioning import CHUNK_LENGTH, chunk_prompt
from sdterm.engine.prompt.tokenizer import PromptError
from sdterm.prompt_syntax import parse_attention

from .conftest import small_request

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- chunking, with a word-per-token tokenizer ----------------------------------------------

BOS, EOS, COMMA = 1, 2, 3


class WordTokenizer:
    """One id per word (10 + a stable number), ',' its own token."""

    def __init__(self):
        self.words: dict[str, int] = {}

    def ids(self, text: str) -> list[int]:
        out = []
        for w in re.findall(r",|[^\s,]+", text):
            out.append(COMMA if w == "," else self.words.setdefault(w, 10 + len(self.words)))
        return out

    def specials(self):
        return BOS, EOS, EOS, COMMA


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def body(chunk) -> list[int]:
    """The chunk's ids without BOS, the final EOS and the EOS padding."""
    ids = list(chunk.ids[1:-1])
    while ids and ids[-1] == EOS:
        ids.pop()
    return ids


def chunks_of(text: str, **kw):
    tok = WordTokenizer()
    out = chunk_prompt(text, tok, parse=kw.pop("parse", lambda t: [[t, 1.0]]), **kw)
    for c in out.chunks:
        assert len(c.ids) == len(c.multipliers) == CHUNK_LENGTH + 2
        assert c.ids[0] == BOS and c.ids[-1] == EOS
    return out, tok


def test_exactly_75_tokens_is_one_chunk():
    out, tok = chunks_of(words(75))
    assert len(out.chunks) == 1 and out.n_tokens == 75
    assert body(out.chunks[0]) == tok.ids(words(75))


def test_76_tokens_are_two_chunks():
    out, tok = chunks_of(words(76))
    assert len(out.chunks) == 2 and out.n_tokens == 76
    assert body(out.chunks[0]) == tok.ids(words(75)) and body(out.chunks[1]) == tok.ids("w75")
    assert out.chunks[1].ids == (BOS, tok.ids("w75")[0]) + (EOS,) * 75


def test_a_comma_near_the_end_moves_the_words_after_it():
    # 70 words, a comma, 10 words: the chunk fills at 75 with 4 words after the comma (5 <= 20
    # tokens back): those 4 move to the next chunk, which gets all 10.
    out, tok = chunks_of(words(70) + " , " + words(10, 70))
    first, second = (body(c) for c in out.chunks)
    assert first == tok.ids(words(70)) + [COMMA]
    assert second == tok.ids(words(10, 70))
    assert out.n_tokens == 75 + 10


def test_a_comma_too_far_back_moves_nothing():
    out, tok = chunks_of(words(50) + " , " + words(30, 50))  # the comma is 25 > 20 tokens back
    first, second = (body(c) for c in out.chunks)
    assert first == tok.ids(words(50) + " , " + words(24, 50)) and second == tok.ids(words(6, 74))
    out, _ = chunks_of(words(70) + " , " + words(10, 70), backtrack=0)  # the option off
    assert len(body(out.chunks[0])) == 75


def test_weights_move_with_their_tokens():
    frags = [[words(70) + " ,", 1.0], [words(10, 70), 1.5]]
    out, _ = chunks_of("", parse=lambda t: frags)
    first, second = out.chunks
    assert first.multipliers == (1.0,) * 77
    assert second.multipliers == (1.0,) + (1.5,) * 10 + (1.0,) * 66


def test_break_closes_the_chunk_and_adjacent_breaks_give_an_empty_chunk():
    frags = [["a b", 1.0], ["BREAK", -1], ["c", 1.2], ["BREAK", -1], ["", 1.0], ["BREAK", -1], ["d", 1.0]]
    out, tok = chunks_of("", parse=lambda t: frags)
    assert [body(c) for c in out.chunks] == [tok.ids("a b"), tok.ids("c"), [], tok.ids("d")]
    assert out.chunks[1].multipliers[:3] == (1.0, 1.2, 1.0)
    assert out.chunks[2].ids == (BOS,) + (EOS,) * 76
    assert out.n_tokens == 3 * 75 + 1
    # A BREAK at the very start closes an empty first chunk (A1111 does the same).
    out, tok = chunks_of("", parse=lambda t: [["BREAK", -1], ["x", 1.0]])
    assert [body(c) for c in out.chunks] == [[], tok.ids("x")]


def test_the_empty_prompt_is_one_chunk_of_bos_and_eos():
    out, _ = chunks_of("")
    assert len(out.chunks) == 1 and out.n_tokens == 0
    assert out.chunks[0].ids == (BOS,) + (EOS,) * 76 and out.chunks[0].multipliers == (1.0,) * 77


def test_the_parsers_fragments_and_a_break_inside_brackets_is_text():
    out, tok = chunks_of("a (b c:1.5) [d] BREAK e", parse=parse_attention)
    assert [body(c) for c in out.chunks] == [tok.ids("a b c d"), tok.ids("e")]
    assert out.chunks[0].multipliers[:6] == (1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0)
    # A1111: BREAK inside brackets gets the brackets' weight (-1.2), so it is no break but a word.
    out, tok = chunks_of("(a BREAK b:1.2)", parse=parse_attention)
    assert [body(c) for c in out.chunks] == [tok.ids("a BREAK b")]
    assert out.chunks[0].multipliers[:4] == (1.0, 1.2, -1.2, 1.2)


def test_too_many_chunks_is_one_line():
    with pytest.raises(PromptError, match="chunks"):
        chunks_of(words(75 * 8 + 1))
    assert len(chunks_of(words(75 * 8))[0].chunks) == 8


# ---- numbers: the engine's conditioning against CLIPTextModel itself ------------------------

def reference(encoder, chunks: list[list[tuple[str, float]]], clip_skip: int) -> torch.Tensor:
    """Each chunk (its weighted fragments) encoded alone: BOS + ids + EOS padding, the hidden state
    clip_skip - 1 layers before the last through the final layer norm, rounded to fp16 (what
    sdterm caches), weights multiplied in fp32, the chunk's mean restored (A1111's order)."""
    model, tok = encoder
    out = []
    for frags in chunks:
        ids, mults = [], []
        for text, w in frags:
            t = tok(text, add_special_tokens=False)["input_ids"]
            ids += t
            mults += [w] * len(t)
        assert len(ids) <= 75
        ids = [tok.bos_token_id] + ids + [tok.eos_token_id] * (76 - len(ids))
        mults = [1.0] + mults + [1.0] * (76 - len(mults))
        with torch.no_grad():
            res = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            norm = getattr(model, "text_model", model).final_layer_norm
            z = res.last_hidden_state if clip_skip == 1 else norm(res.hidden_states[-clip_skip])
        z = z.half()
        original_mean = z.mean()
        z = z * torch.tensor(mults, dtype=torch.float32)[None, :, None]
        z = z * (original_mean / z.mean())
        out.append(z)
    return torch.cat(out, dim=1)


def contexts(engine, monkeypatch, **kw) -> list[torch.Tensor]:
    """The context of each U-Net call of a render of ``small_request(**kw)`` (one step unless
    ``steps`` is given)."""
    unet = engine.models.module("unet")
    seen: list[torch.Tensor] = []
    forward = unet.forward

    def recorded(x, t, context):
        seen.append(context.clone())
        return forward(x, t, context)

    monkeypatch.setattr(unet, "forward", recorded)
    engine.generate(small_request(**{"steps": 1, **kw}))
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_conditioning_equals_clip_text_model(demo_model, reference_encoder, monkeypatch, clip_skip):
    prompt = "a (red fox:1.3), [snow] in the city BREAK ((castle)) on a hill"
    engine = Engine(open_model(demo_model), "cpu")
    (ctx,) = contexts(engine, monkeypatch, prompt=prompt, cfg=1.0, clip_skip=clip_skip)
    want = reference(reference_encoder, [
        [("a ", 1.0), ("red fox", 1.3), (", ", 1.0), ("snow", 1 / 1.1), (" in the city", 1.0)],
        [("castle", 1.1 * 1.1), (" on a hill", 1.0)],
    ], clip_skip)
    assert ctx.shape == (1, 154, 32)
    torch.testing.assert_close(ctx, want, rtol=1e-6, atol=1e-6)


def test_the_chunk_means_are_far_from_zero(reference_encoder):
    """The demo's final layer norm is not an identity: restoring the mean divides by no ~0."""
    model, tok = reference_encoder
    for text in ("a red fox", "", "castle on a hill"):
        ids = tok(text, padding="max_length", max_length=77)["input_ids"]
        with torch.no_grad():
            z = model(input_ids=torch.tensor([ids])).last_hidden_state
        assert abs(float(z.mean())) > 0.2, text


def test_the_comma_token_is_the_vocabularys(demo_model, reference_encoder):
    from sdterm.engine.prompt.tokenizer import PromptTokenizer

    _, tok = reference_encoder
    bos, eos, pad, comma = PromptTokenizer(demo_model / "tokenizer").specials()
    assert (bos, eos, pad) == (tok.bos_token_id, tok.eos_token_id, tok.eos_token_id)
    assert comma == tok.get_vocab()[",</w>"] == tok(",", add_special_tokens=False)["input_ids"][0]


# ---- pixels and the cache -------------------------------------------------------------------

def _engine(demo_model, folder) -> Engine:
    return Engine(open_model(demo_model), "cpu", cache=EmbeddingCache(folder))


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def test_weight_one_is_the_plain_prompt_and_nested_brackets_are_1_21(demo_model):
    engine = Engine(open_model(demo_model), "cpu")
    render = lambda p: pixels(engine.generate(small_request(prompt=p, negative="blurry")))  # noqa: E731
    plain = render("red fox")
    assert np.array_equal(render("(red:1.0) fox"), plain)
    nested, explicit = render("((red)) fox"), render("(red:1.21) fox")
    assert np.abs(nested - explicit).max() <= 1
    assert np.abs(render("(red:1.5) fox") - plain).mean() > 1  # a weight does change the image
    assert np.abs(render("[red] fox") - render("(red:0.909091) fox")).max() <= 1


def test_changing_only_weights_or_chunk_order_never_runs_the_encoder(demo_model, tmp_path):
    first = _engine(demo_model, tmp_path).generate(small_request(prompt="a (red:1.2) fox BREAK castle"))
    assert first.stages[0].cache == "miss"
    engine = _engine(demo_model, tmp_path)  # a fresh engine: nothing built yet

    def forbidden():
        raise AssertionError("the text encoder was built though every chunk was cached")

    engine.models.factories["text"] = forbidden
    for prompt in ("a (red:1.5) fox BREAK castle", "a red fox BREAK (castle:0.7)", "castle BREAK a [red] fox"):
        r = engine.generate(small_request(prompt=prompt))
        assert r.stages[0].cache == "hit" and r.stages[0].skipped, prompt
        assert r.stages[0].cache_texts == {"prompt": "hit", "negative": "hit"}
        assert not np.array_equal(pixels(r), pixels(first)), prompt
    assert "text" not in engine.models._modules


def test_hit_and_miss_are_pixel_identical_with_weights_and_clip_skip(demo_model, tmp_path):
    req = small_request(prompt="a (red fox:1.3), [snow] BREAK castle", negative="(blurry:1.2)", clip_skip=2, seed=4)
    miss = _engine(demo_model, tmp_path).generate(req)
    hit = _engine(demo_model, tmp_path).generate(req)
    plain = Engine(open_model(demo_model), "cpu").generate(req)
    assert (miss.stages[0].cache, hit.stages[0].cache) == ("miss", "hit")
    assert miss.image.tobytes() == hit.image.tobytes() == plain.image.tobytes()
    # Clip skip is in the key: another clip skip is a miss, and another image.
    other = _engine(demo_model, tmp_path).generate(dataclasses.replace(req, clip_skip=1))
    assert other.stages[0].cache == "miss" and other.image.tobytes() != miss.image.tobytes()


def test_a_new_chunk_beside_cached_ones_is_a_partial_hit(demo_model, tmp_path):
    _engine(demo_model, tmp_path).generate(small_request(prompt="a red fox"))
    r = _engine(demo_model, tmp_path).generate(small_request(prompt="a red fox BREAK snow"))
    assert r.stages[0].cache_texts == {"prompt": "partial", "negative": "hit"}


def test_different_chunk_counts_go_through_the_unet_apart(demo_model, monkeypatch):
    engine = Engine(open_model(demo_model), "cpu")
    seen = contexts(engine, monkeypatch, prompt="a red fox BREAK snow", negative="blurry", cfg=7.5)
    assert [tuple(c.shape) for c in seen] == [(1, 77, 32), (1, 154, 32)]  # uncond, cond: two passes
    same = contexts(engine, monkeypatch, prompt="a red fox", negative="blurry", cfg=7.5)
    assert [tuple(c.shape) for c in same] == [(2, 77, 32)]  # equal counts: one batch of two
    # The split passes give the image that separate guidance computes (no padding with empty chunks).
    r = engine.generate(small_request(prompt="a red fox BREAK snow", negative="blurry", cfg=7.5))
    assert np.isfinite(np.asarray(r.image, dtype=np.float32)).all()


def test_a_clip_skip_beyond_the_encoders_layers_is_clamped_with_a_notice(demo_model):
    from sdterm.engine.events import Notice

    engine = Engine(open_model(demo_model), "cpu")
    notices: list[str] = []
    a = engine.generate(small_request(clip_skip=5), emit=lambda e: isinstance(e, Notice) and notices.append(e.message))
    b = engine.generate(small_request(clip_skip=3))
    assert a.image.tobytes() == b.image.tobytes()
    assert any("clip skip 5" in n for n in notices)


def test_guidance_runs_cond_and_uncond_of_different_lengths_as_two_passes():
    from sdterm.engine.sampling.guidance import guided

    calls: list[tuple[int, ...]] = []

    def unet(x, t, context):
        calls.append(tuple(context.shape))
        return x * context.mean()

    cond, uncond = torch.full((1, 154, 4), 2.0), torch.full((1, 77, 4), 1.0)
    x = torch.ones(1, 4, 2, 2)
    eps = guided(unet, cond, uncond, 7.5, split=False)(x, 10)
    assert calls == [(1, 77, 4), (1, 154, 4)]
    torch.testing.assert_close(eps, x * (1 + 7.5 * (2 - 1)))
