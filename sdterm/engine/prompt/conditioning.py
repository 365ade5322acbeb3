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

Scheduling (``[from:to:when]``, ``[a|b]``): :class:`RolePrompt` holds A1111's schedule of a
role's text; A1111 encodes the schedule's texts as one batch (the shorter ones padded with empty
chunks, which they keep) and restores the emphasis mean over that batch per chunk index, so
:meth:`RolePrompt.conditioning` assembles them together into a :class:`Conditioning` that gives
the tensor for each denoiser call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .tokenizer import MAX_CHUNKS, PromptError

if TYPE_CHECKING:
    import torch

    from .embeddings import TextualInversion

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
class Fix:
    """A textual-inversion embedding's vectors in a chunk (A1111's ``PromptChunkFix``): they
    replace the token embeddings at ``position`` ... ``position + n_vectors - 1`` of the 77."""

    position: int
    """Index in the chunk's 77 positions (BOS is 0) of the first vector."""
    embedding: TextualInversion


@dataclass(frozen=True)
class Chunk:
    ids: tuple[int, ...]
    """BOS, 75 ids (EOS-padded), EOS: what the encoder sees (an embedding's positions hold 0)."""
    multipliers: tuple[float, ...]
    """The emphasis multiplier of each of the 77 positions (1.0 on BOS, EOS and padding)."""
    fixes: tuple[Fix, ...] = ()
    """Embeddings placed in this chunk (never one across two chunks)."""
    length: int = 0
    """Prompt tokens (embedding vectors included) before the padding."""

    @property
    def key(self) -> tuple:
        """What the encoder's output depends on besides the model: the ids and each embedding's
        position and file hash (the cache key, and the key of a render's chunk table)."""
        return self.ids, tuple((f.position, f.embedding.sha256) for f in self.fixes)

    @property
    def fix_signature(self) -> str:
        """The embeddings part of the cache key ("" without embeddings)."""
        return ",".join(f"{f.position}:{f.embedding.sha256}" for f in self.fixes)


@dataclass(frozen=True)
class PromptChunks:
    text: str
    chunks: tuple[Chunk, ...]
    n_tokens: int
    """A1111's token count: 75 per closed chunk plus the last chunk's tokens."""

    @property
    def embeddings(self) -> list[TextualInversion]:
        """The embeddings used, in order of first use, each once."""
        seen: dict[str, TextualInversion] = {}
        for c in self.chunks:
            for f in c.fixes:
                seen.setdefault(f.embedding.sha256 + f.embedding.name, f.embedding)
        return list(seen.values())


def chunk_prompt(text: str, tokenizer, *, parse: Parse | None = None, embeddings=None,
                 backtrack: int = COMMA_BACKTRACK, max_chunks: int | None = MAX_CHUNKS) -> PromptChunks:
    """``text`` as A1111 chunks it (``tokenize_line``). ``tokenizer`` gives ``ids(text)`` (no
    BOS/EOS) and ``specials()`` (BOS, EOS, padding, comma ids). ``embeddings`` (an
    ``EmbeddingDB``, or anything with its ``find``) puts textual-inversion vectors where their
    trigger words are: an embedding that doesn't fit in what is left of a chunk starts the next.

    One departure from A1111: when the comma backtrack moves the words after a comma to the next
    chunk, an embedding among them moves with them (A1111 leaves its vectors behind, past the end
    of the chunk they no longer belong to).
    """
    parse = parse or _default_parse()
    bos, eos, _pad, comma = tokenizer.specials()
    n = CHUNK_LENGTH
    parsed = parse(text)
    chunks: list[Chunk] = []
    ids: list[int] = []
    mults: list[float] = []
    fixes: list[Fix] = []
    count = 0
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal ids, mults, fixes, count, last_comma
        count += len(ids) if is_last else n
        length = len(ids)
        pad = n - len(ids)
        if pad > 0:
            ids += [eos] * pad  # SD1: id_pad = id_end
            mults += [1.0] * pad
        chunks.append(Chunk((bos, *ids, eos), (1.0, *mults, 1.0), tuple(fixes), length))
        ids, mults, fixes, last_comma = [], [], [], -1

    for frag, weight in parsed:
        if frag == "BREAK" and weight == -1:
            close()
            continue
        tokens = tokenizer.ids(frag)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == n and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                moved = ids[cut:], mults[cut:], [Fix(f.position - cut, f.embedding) for f in fixes if f.position > cut]
                ids, mults, fixes = ids[:cut], mults[:cut], [f for f in fixes if f.position <= cut]
                close()
                ids, mults, fixes = list(moved[0]), list(moved[1]), moved[2]
            if len(ids) == n:
                close()
            found = embeddings.find(tokens, position, tokenizer.ids) if embeddings is not None else None
            if found is None:
                ids.append(token)
                mults.append(float(weight))
                position += 1
                continue
            emb, covered = found
            if len(ids) + emb.n_vectors > n:
                close()
            fixes.append(Fix(len(ids) + 1, emb))  # + 1: BOS comes first
            ids += [0] * emb.n_vectors
            mults += [float(weight)] * emb.n_vectors
            position += covered
    if ids or not chunks:
        close(is_last=True)
    if max_chunks is not None and len(chunks) > max_chunks:
        raise PromptError(f"prompt is {count} tokens in {len(chunks)} chunks; at most {max_chunks} chunks "
                          f"of {n} ({max_chunks * n} tokens) are supported")
    return PromptChunks(text, tuple(chunks), count)


def effective_clip_skip(clip_skip: int, num_layers: int) -> int:
    """Clip skip within what the encoder has: at most its layers + 1 (the token embeddings)."""
    return max(1, min(int(clip_skip), num_layers + 1))


def encode_chunk(model, chunk: Chunk, clip_skip: int, device) -> torch.Tensor:
    """A chunk's (77, dim) unweighted encoder output, as A1111's ``encode_with_transformers``
    (clip skip N > 1: ``hidden_states[-N]`` through the final layer norm), with its embeddings'
    vectors in place of the token embeddings at their positions (A1111's ``EmbeddingsWithFixes``:
    the position embeddings are added to them as to any token)."""
    import torch

    from ..networks.clip import clip_inner

    x = torch.tensor([list(chunk.ids)], dtype=torch.long, device=device)
    inner = clip_inner(model)
    handle = None
    if chunk.fixes:
        def place(_module, _args, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for f in chunk.fixes:
                v = f.embedding.vectors
                out[:, f.position:f.position + v.shape[0]] = v.to(out.device, out.dtype)
            return out

        handle = inner.embeddings.token_embedding.register_forward_hook(place)
    try:
        if clip_skip <= 1:
            return model(input_ids=x).last_hidden_state[0]
        out = model(input_ids=x, output_hidden_states=True)
        hidden = out.hidden_states[-min(clip_skip, len(out.hidden_states))]
        return inner.final_layer_norm(hidden)[0]
    finally:
        if handle is not None:
            handle.remove()


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


def assemble(batch: Sequence[PromptChunks], unweighted: Callable[[tuple], torch.Tensor],
             filler: Chunk | None = None) -> list[torch.Tensor]:
    """One (1, 77 * chunks, dim) fp32 conditioning per entry of ``batch``, A1111's ``forward`` on
    the batch: chunk index by chunk index, the entries lacking that chunk take ``filler`` (the
    empty prompt's chunk; needed only when the chunk counts differ) and keep it, as A1111 does, so
    every entry comes out as long as the longest; emphasis over the batch. ``unweighted(key)``
    gives a chunk's cached (77, dim) encoder output by its :attr:`Chunk.key`."""
    import torch

    count = max(len(p.chunks) for p in batch)
    if filler is None and any(len(p.chunks) != count for p in batch):
        raise ValueError("entries with fewer chunks need a filler chunk")
    parts: list[list[torch.Tensor]] = [[] for _ in batch]
    for i in range(count):
        at = [p.chunks[i] if i < len(p.chunks) else filler for p in batch]
        z = torch.stack([unweighted(c.key) for c in at])
        weighted = emphasize(z, [list(c.multipliers) for c in at])
        for j in range(len(batch)):
            parts[j].append(weighted[j])
    return [torch.cat(zs)[None] for zs in parts]


@dataclass
class Conditioning:
    """A role's (prompt's or negative's) conditioning for a render: ``segments[k]`` is the
    (1, tokens, dim) tensor for denoiser calls before ``ends[k]`` (A1111 counts the calls of the
    classifier-free-guidance denoiser from 0: a schedule entry ending at step s covers calls
    0 ... s, so its end here is s + 1). Every segment has the same token count."""

    segments: list[torch.Tensor]
    ends: list[int]

    @classmethod
    def single(cls, tensor: torch.Tensor) -> Conditioning:
        return cls([tensor], [2**62])

    def at(self, call: int) -> torch.Tensor:
        """The tensor for denoiser call ``call`` (0-based). Past the last end A1111 falls back to
        the first entry (its ``reconstruct_cond_batch``); no sampler here calls that often."""
        for tensor, end in zip(self.segments, self.ends):
            if call < end:
                return tensor
        return self.segments[0]

    @property
    def scheduled(self) -> bool:
        return len(self.segments) > 1

    @property
    def tensor(self) -> torch.Tensor:
        """The only segment (an unscheduled prompt)."""
        if len(self.segments) != 1:
            raise ValueError("a scheduled conditioning has no single tensor")
        return self.segments[0]

    def to(self, *args, **kwargs) -> Conditioning:
        """Moved or cast, segments shared between entries staying shared."""
        moved: dict[int, torch.Tensor] = {}
        out = [moved.setdefault(id(t), t.to(*args, **kwargs)) for t in self.segments]
        return Conditioning(out, list(self.ends))


@dataclass(frozen=True)
class RolePrompt:
    """A role's text as a render uses it: the schedule A1111 makes of it (``[a:b:when]``,
    ``[a|b]``): ``(end_step, chunks)`` entries, each used while the denoiser call count is at most
    its end_step, all encoded as one A1111 batch."""

    text: str
    schedule: tuple[tuple[int, PromptChunks], ...]

    @property
    def entries(self) -> list[PromptChunks]:
        return [p for _end, p in self.schedule]

    @property
    def chunks(self) -> list[Chunk]:
        """Every chunk of every entry (repeats included)."""
        return [c for p in self.entries for c in p.chunks]

    @property
    def n_tokens(self) -> int:
        return max(p.n_tokens for p in self.entries)

    def used_embeddings(self) -> list[TextualInversion]:
        """The embeddings the encoding uses, in A1111's order (chunk index, then batch entry,
        then position), each once."""
        seen: dict[str, TextualInversion] = {}
        entries = self.entries
        for i in range(max(len(p.chunks) for p in entries)):
            for p in entries:
                if i < len(p.chunks):
                    for f in p.chunks[i].fixes:
                        seen.setdefault(f.embedding.name, f.embedding)
        return list(seen.values())

    def conditioning(self, unweighted: Callable[[tuple], torch.Tensor], filler: Chunk) -> Conditioning:
        """The role's :class:`Conditioning` from the cached unweighted chunks: the whole schedule
        as one batch (A1111 restores the emphasis mean over it), equal texts sharing a tensor."""
        tensors = assemble(self.entries, unweighted, filler)
        by_text: dict[str, torch.Tensor] = {}
        segments: list = []
        ends: list[int] = []
        previous = None
        for (end, p), t in zip(self.schedule, tensors):
            if p.text == previous:
                ends[-1] = end + 1
                continue
            segments.append(by_text.setdefault(p.text, t))
            ends.append(end + 1)
            previous = p.text
        return Conditioning(segments, ends)


def schedule_steps(steps: int, second_order: bool) -> int:
    """The step count A1111 schedules prompts over: its sampler's ``total_steps`` (twice the
    steps for a second-order sampler, whose denoiser calls the schedule counts)."""
    return steps * 2 if second_order else steps


def role_prompt(text: str, tokenizer, steps: int, *, embeddings=None, parse: Parse | None = None,
                hires_steps: int | None = None) -> RolePrompt:
    """``text``'s schedule over ``steps`` (see :func:`schedule_steps`), each text chunked; with
    ``hires_steps``, its schedule over a hires fix's second pass (A1111's offsets: ``[a:b:1.5]``
    switches halfway through it, a fraction below 1 or a step within ``steps`` is already past)."""
    from ...prompt_syntax import schedules

    memo: dict[str, PromptChunks] = {}
    schedule = []
    for end, t in schedules(text, steps, hires_steps):
        if t not in memo:
            memo[t] = chunk_prompt(t, tokenizer, parse=parse, embeddings=embeddings)
        schedule.append((end, memo[t]))
    return RolePrompt(text, tuple(schedule))


def prepare_prompts(req, tokenizer, layers: int, notice, *, steps: int | None = None,
                    embeddings=None) -> tuple[RolePrompt, RolePrompt, int]:
    """The prompt's and the negative's schedules of chunks (over ``steps``, see
    :func:`schedule_steps`; default the request's steps) and the clip skip this encoder can do
    (``layers`` deep), with the notices a render gives about them (empty prompt, several chunks,
    AND, clip skip clamped)."""
    from ...prompt_syntax import split_and

    steps = req.steps if steps is None else steps
    pos = role_prompt(req.prompt, tokenizer, steps, embeddings=embeddings)
    neg = role_prompt(req.negative, tokenizer, steps, embeddings=embeddings)
    if not req.prompt.strip():
        notice("empty prompt: rendering unconditionally")
    if split_and(req.prompt)[1]:
        notice("AND (composable diffusion) is not supported: the prompt was rendered with AND as a word")
    longest = max(pos.entries, key=lambda p: len(p.chunks))
    if len(longest.chunks) > 1:
        notice(f"prompt is {longest.n_tokens} tokens: encoded as {len(longest.chunks)} chunks of {CHUNK_LENGTH}")
    clip_skip = effective_clip_skip(req.clip_skip, layers)
    if clip_skip != req.clip_skip:
        notice(f"clip skip {req.clip_skip}: this text encoder has {layers} layers; using {clip_skip}", "warning")
    return pos, neg, clip_skip


def cache_status(texts: dict[str, RolePrompt], cached) -> tuple[str, dict[str, str]]:
    """(overall, per role) "hit" / "miss" / "partial" for the chunks found in the cache."""
    status = {}
    for role, p in texts.items():
        keys = {c.key for c in p.chunks}
        hits = sum(k in cached for k in keys)
        status[role] = "hit" if hits == len(keys) else ("miss" if hits == 0 else "partial")
    values = set(status.values())
    return (values.pop() if len(values) == 1 else "partial"), status


def needed_chunks(texts: dict[str, RolePrompt], filler: Chunk) -> list[Chunk]:
    """Every distinct chunk a render encodes: each role's schedule entries' chunks, and the empty
    chunk where a role's entries differ in chunk count (A1111 pads them with it)."""
    out: dict[tuple, Chunk] = {}
    for p in texts.values():
        for c in p.chunks:
            out.setdefault(c.key, c)
        if len({len(e.chunks) for e in p.entries}) > 1:
            out.setdefault(filler.key, filler)
    return list(out.values())
