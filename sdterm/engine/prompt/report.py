"""What a prompt became, for people: the live token report the app shows under the prompt box
(InvokeAI's "log tokenization", live), the summary ``sdterm generate --json`` prints, and the
infotext fields a render adds (A1111's ``TI hashes``)."""

from __future__ import annotations

from dataclasses import dataclass

from .conditioning import RolePrompt, role_prompt


@dataclass(frozen=True)
class Piece:
    """A run of a chunk's positions with one weight: plain tokens, or one embedding's vectors."""

    text: str
    """What the tokens read as (a word's last token followed by a space), or the trigger word."""
    weight: float
    tokens: int
    """Positions it takes in the chunk (an embedding: its vectors)."""
    embedding: str | None = None
    """The trigger word, where this is a textual-inversion embedding."""


@dataclass(frozen=True)
class PromptReport:
    """How a text is tokenized, chunked and weighted (InvokeAI's "log tokenization", live)."""

    tokens: int
    """A1111's count: 75 per closed chunk plus the last chunk's tokens."""
    chunks: tuple[tuple[Piece, ...], ...]
    """Each chunk's pieces in order; a chunk's tokens are the sum of its pieces' (at most 75)."""
    embeddings: tuple[str, ...]
    """Trigger words found, each once, in order."""
    variants: int
    """Distinct texts in the prompt's schedule (1: nothing scheduled); the report is of the one
    with the most tokens, as A1111's token counter shows."""
    has_and: bool
    """``AND`` as a word: A1111 would split the prompt (composable diffusion); sdterm reads it as text."""


def explain(text: str, tokenizer, steps: int, *, embeddings=None) -> PromptReport:
    """``text`` as a render would chunk it (the schedule entry with the most tokens), for display;
    ``<lora:...>`` tags are left out, as a render leaves them out of what CLIP sees."""
    from ...prompt_syntax import NetworkTagError, extra_networks, split_and

    try:
        text = extra_networks(text)[0]
    except NetworkTagError:
        pass  # a tag whose weight isn't a number: the parameter line shows its error

    role = role_prompt(text, tokenizer, steps, embeddings=embeddings)
    entry = max(role.entries, key=lambda p: p.n_tokens)
    chunks = []
    for c in entry.chunks:
        fixes = {f.position: f for f in c.fixes}
        pieces: list[Piece] = []
        run: list[int] = []
        weight = None
        pos = 1

        def flush() -> None:
            if run:
                pieces.append(Piece(tokenizer.decode(run), weight, len(run)))
                run.clear()

        while pos <= c.length:
            fix = fixes.get(pos)
            if fix is not None:
                flush()
                n = fix.embedding.n_vectors
                pieces.append(Piece(fix.embedding.name, c.multipliers[pos], n, fix.embedding.name))
                pos += n
                continue
            if c.multipliers[pos] != weight:
                flush()
                weight = c.multipliers[pos]
            run.append(c.ids[pos])
            pos += 1
        flush()
        chunks.append(tuple(pieces))
    names = tuple(dict.fromkeys(e.name for e in entry.embeddings))
    return PromptReport(entry.n_tokens, tuple(chunks), names, len({p.text for p in role.entries}), split_and(text)[1])


def prompt_summary(p: RolePrompt) -> dict:
    """What a render made of a role's text, for ``generate --json``: tokens, chunks (prompt tokens
    in each), embeddings used, and the schedule (each text with the last step it is used for)."""
    first = p.entries[0]
    return {
        "tokens": p.n_tokens,
        "chunks": [c.length for c in first.chunks],
        "embeddings": [{"name": e.name, "vectors": e.n_vectors, "hash": e.hash, "file": str(e.path)}
                       for e in p.used_embeddings()],
        "schedule": [{"until_step": end, "text": e.text, "chunks": [c.length for c in e.chunks]}
                     for end, e in p.schedule] if len(p.schedule) > 1 else [],
    }


def infotext_extra(pos: RolePrompt, neg: RolePrompt | None) -> dict[str, str]:
    """The infotext fields a render adds (A1111's ``extra_generation_params``): ``TI hashes``, the
    prompt's embeddings then the negative's (A1111 encodes the negative first and each encoding
    puts its list before the one already there); ``neg`` None at CFG scale 1, where A1111 doesn't
    encode the negative."""
    from .embeddings import ti_hashes

    parts = [ti_hashes(r.used_embeddings()) for r in (pos, neg) if r is not None]
    value = ", ".join(part for part in parts if part)
    return {"TI hashes": value} if value else {}
