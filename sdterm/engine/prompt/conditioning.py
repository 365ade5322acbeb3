"""A1111's prompt conditioning, text-encoder side: weighted fragments -> 75-token chunks with
per-token multipliers -> the encoder's unweighted output per chunk -> emphasis.

Following AUTOMATIC1111's ``FrozenCLIPEmbedderWithCustomWordsBase`` (modules/sd_hijack_clip.py)
with its defaults (emphasis "Original", ``comma_padding_backtrack`` 20, SD1's padding with EOS):

- :func:`chunk_prompt`: the prompt is parsed into ``(text, weight)`` fragments (A1111's
  ``parse_prompt_attention``, ``sdterm.prompt_syntax.parse_attention``), each tokenized without
  BOS/EOS. Tokens fill chunks of 75; when a chunk is full and the last comma is within 20 tokens
  of its end, the tokens after that comma move to the next chunk; ``BREAK`` closes the current
  chunk (even an empty one); each chunk becomes BOS + 75 + EOS, padded with EOS, multipliers 1.0
  on BOS, EOS and padding. An empty prompt is one chunk of BOS EOS EOS ...
- :func:`encode_chunk`: one chunk's encoder output, unweighted (what the embedding cache holds):
  the last hidden state, or with clip skip N the hidden state N-1 layers before the last through
  the final layer norm.
- :func:`emphasize`: A1111's "Original" emphasis on a batch of chunks at one chunk index:
  ``z * multipliers``, then ``z * (original_mean / new_mean)``, in A1111's order and dtypes (the
  fp16 encoder output's mean in fp16, the multipliers fp32, so the result is fp32).
- :func:`assemble`: a role's conditioning from the cached unweighted chunks, chunks concatenated
  along the tokens.

Scheduling (``[from:to:when]``, next session) fits here: A1111 encodes a prompt's schedule texts
as one batch (the shorter ones padded with empty chunks) and restores the mean over that batch
per chunk index, which is why :func:`assemble` takes several :class:`PromptChunks` and a
:class:`Conditioning` holds one tensor per segment with the step where it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .tokenizer import MAX_CHUNKS, PromptError

if TYPE_CHECKING:
    import torch

CHUNK_LENGTH = 75
"""Prompt tokens per chunk (A1111's ``chunk_length``)."""
COMMA_BACKTRACK = 20
"""A1111's ``opts.comma_padding_backtrack`` default."""

Parse = Callable[[str], list]


def _default_parse() -> Parse:
    try:
        from ...prompt_syntax import parse_attention
    except ImportError:  # the parser has not landed yet: the prompt is plain text
        return lambda text: [[text, 1.0]]
    return parse_attention


@dataclass(frozen=True)
class Chunk:
    ids: tuple[int, ...]
    """BOS, 75 ids (EOS-padded), EOS: what the encoder sees (and the cache key)."""
    multipliers: tuple[float, ...]
    """The emphasis multiplier of each of the 77 positions (1.0 on BOS, EOS and padding)."""


@dataclass(frozen=True)
class PromptChunks:
    text: str
    chunks: tuple[Chunk, ...]
    n_tokens: int
    """A1111's token count: 75 per closed chunk plus the last chunk's tokens."""


def chunk_prompt(text: str, tokenizer, *, parse: Parse | None = None,
                 backtrack: int = COMMA_BACKTRACK, max_chunks: int | None = MAX_CHUNKS) -> PromptChunks:
    """``text`` as A1111 chunks it (``tokenize_line``). ``tokenizer`` gives ``ids(text)`` (no
    BOS/EOS) and ``specials()`` (BOS, EOS, padding, comma ids)."""
    parse = parse or _default_parse()
    bos, eos, _pad, comma = tokenizer.specials()
    n = CHUNK_LENGTH
    parsed = parse(text)
    chunks: list[Chunk] = []
    ids: list[int] = []
    mults: list[float] = []
    count = 0
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal ids, mults, count, last_comma
        count += len(ids) if is_last else n
        pad = n - len(ids)
        if pad > 0:
            ids += [eos] * pad  # SD1: id_pad = id_end
            mults += [1.0] * pad
        chunks.append(Chunk((bos, *ids, eos), (1.0, *mults, 1.0)))
        ids, mults, last_comma = [], [], -1

    for frag, weight in parsed:
        if frag == "BREAK" and weight == -1:
            close()
            continue
        for token in tokenizer.ids(frag):
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == n and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                moved_ids, moved_mults = ids[cut:], mults[cut:]
                ids, mults = ids[:cut], mults[:cut]
                close()
                ids, mults = moved_ids, moved_mults
            if len(ids) == n:
                close()
            ids.append(token)
            mults.append(float(weight))
    if ids or not chunks:
        close(is_last=True)
    if max_chunks is not None and len(chunks) > max_chunks:
        raise PromptError(f"prompt is {count} tokens in {len(chunks)} chunks; at most {max_chunks} chunks "
                          f"of {n} ({max_chunks * n} tokens) are supported")
    return PromptChunks(text, tuple(chunks), count)


def effective_clip_skip(clip_skip: int, num_layers: int) -> int:
    """Clip skip within what the encoder has: at most its layers + 1 (the token embeddings)."""
    return max(1, min(int(clip_skip), num_layers + 1))


def encode_chunk(model, ids: Sequence[int], clip_skip: int, device) -> torch.Tensor:
    """(77,) ids -> (77, dim): the encoder's unweighted output for one chunk, as A1111's
    ``encode_with_transformers`` (clip skip N > 1: ``hidden_states[-N]`` through the final layer norm)."""
    import torch

    from ..networks.clip import clip_inner

    x = torch.tensor([list(ids)], dtype=torch.long, device=device)
    if clip_skip <= 1:
        return model(input_ids=x).last_hidden_state[0]
    out = model(input_ids=x, output_hidden_states=True)
    hidden = out.hidden_states[-min(clip_skip, len(out.hidden_states))]
    return clip_inner(model).final_layer_norm(hidden)[0]


def emphasize(z: torch.Tensor, multipliers) -> torch.Tensor:
    """A1111's "Original" emphasis on ``z`` (batch, 77, dim) with ``multipliers`` (batch, 77):
    weights multiplied, then the batch's mean restored to its unweighted value. With z in fp16 (the
    encoder's and the cache's dtype) and fp32 multipliers, as in A1111, the result is fp32."""
    import torch

    m = torch.asarray(multipliers).to(z.device)
    original_mean = z.mean()
    z = z * m.reshape(m.shape + (1,)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)


def empty_chunk(tokenizer) -> Chunk:
    bos, eos, _pad, _comma = tokenizer.specials()
    return Chunk((bos,) + (eos,) * (CHUNK_LENGTH + 1), (1.0,) * (CHUNK_LENGTH + 2))


def assemble(batch: Sequence[PromptChunks], unweighted: Callable[[tuple[int, ...]], torch.Tensor],
             filler: Chunk | None = None) -> list[torch.Tensor]:
    """One (1, 77 * chunks, dim) fp32 conditioning per entry of ``batch``, A1111's ``forward`` on
    the batch: chunk index by chunk index, the entries lacking that chunk take ``filler`` (the
    empty prompt's chunk; needed only when the chunk counts differ), emphasis over the batch.
    ``unweighted(ids)`` gives a chunk's cached (77, dim) encoder output."""
    import torch

    count = max(len(p.chunks) for p in batch)
    if filler is None and any(len(p.chunks) != count for p in batch):
        raise ValueError("entries with fewer chunks need a filler chunk")
    parts: list[list[torch.Tensor]] = [[] for _ in batch]
    for i in range(count):
        at = [p.chunks[i] if i < len(p.chunks) else filler for p in batch]
        z = torch.stack([unweighted(c.ids) for c in at])
        weighted = emphasize(z, [list(c.multipliers) for c in at])
        for j, p in enumerate(batch):
            if i < len(p.chunks):
                parts[j].append(weighted[j])
    return [torch.cat(zs)[None] for zs in parts]


@dataclass
class Conditioning:
    """A role's (prompt's or negative's) conditioning for a render: ``segments[k]`` is the
    (1, tokens, dim) tensor in force until sampler step ``ends[k]`` (exclusive; None: to the end).
    Today there is one segment; prompt scheduling adds more."""

    segments: list[torch.Tensor]
    ends: list[int | None]

    @classmethod
    def single(cls, tensor: torch.Tensor) -> Conditioning:
        return cls([tensor], [None])

    def at(self, step: int) -> torch.Tensor:
        for tensor, end in zip(self.segments, self.ends):
            if end is None or step < end:
                return tensor
        return self.segments[-1]

    @property
    def tensor(self) -> torch.Tensor:
        """The only segment (an unscheduled prompt)."""
        if len(self.segments) != 1:
            raise ValueError("a scheduled conditioning has no single tensor")
        return self.segments[0]


def prepare_prompts(req, tokenizer, layers: int, notice) -> tuple["PromptChunks", "PromptChunks", int]:
    """The prompt's and the negative's chunks and the clip skip this encoder can do (``layers``
    deep), with the notices a render gives about them (empty prompt, several chunks, clip skip
    clamped)."""
    pos, neg = chunk_prompt(req.prompt, tokenizer), chunk_prompt(req.negative, tokenizer)
    if not req.prompt.strip():
        notice("empty prompt: rendering unconditionally")
    if len(pos.chunks) > 1:
        notice(f"prompt is {pos.n_tokens} tokens: encoded as {len(pos.chunks)} chunks of {CHUNK_LENGTH}")
    clip_skip = effective_clip_skip(req.clip_skip, layers)
    if clip_skip != req.clip_skip:
        notice(f"clip skip {req.clip_skip}: this text encoder has {layers} layers; using {clip_skip}", "warning")
    return pos, neg, clip_skip


def cache_status(texts: dict[str, "PromptChunks"], cached) -> tuple[str, dict[str, str]]:
    """(overall, per role) "hit" / "miss" / "partial" for the chunks found in the cache."""
    status = {}
    for role, p in texts.items():
        hits = sum(c.ids in cached for c in p.chunks)
        status[role] = "hit" if hits == len(p.chunks) else ("miss" if hits == 0 else "partial")
    values = set(status.values())
    return (values.pop() if len(values) == 1 else "partial"), status


def cached_chunks(cache, key, texts: dict[str, "PromptChunks"], dim: int) -> dict:
    """The cached unweighted (77, dim) encoder output of each chunk of ``texts`` that ``cache`` has
    (``key(ids)``: the chunk's cache key)."""
    found = {}
    for p in texts.values():
        for c in p.chunks:
            if c.ids not in found:
                emb = cache.get(key(c.ids), dim)
                if emb is not None and emb.shape[0] == len(c.ids):
                    found[c.ids] = emb
    return found
