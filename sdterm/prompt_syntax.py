"""AUTOMATIC1111's prompt language, read the way A1111 (modules/prompt_parser.py) reads it.

A leaf module (standard library only). Three entry points:

* ``parse_attention(text)`` -> ``[(text, weight), ...]``: emphasis. ``(x)`` multiplies by 1.1, ``[x]``
  divides by 1.1, ``(x:1.3)`` multiplies by 1.3, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]``
  ``\\\\`` are literal (any other backslash is dropped), unmatched closers are text, unclosed openers
  apply to the end, equal neighbours merge, ``BREAK`` as a word gives ``("BREAK", -1.0)`` (multiplied
  like any other piece when it sits inside brackets, as in A1111) and nothing gives ``[("", 1.0)]``.
* ``schedules(prompt, steps)`` -> ``[(end_step, text), ...]``: prompt editing ``[from:to:when]``,
  ``[to:when]``, ``[from::when]`` and alternation ``[a|b|...]``, with A1111's step arithmetic; the
  last entry ends at ``steps``. A prompt A1111's grammar rejects (a ``|`` outside an alternation, a
  backslash at the end or before a newline) is one entry with the prompt unchanged.
* ``split_and(prompt)`` -> ``(prompt, has_and)``: whether A1111 would split it for composable
  diffusion (``AND`` as a word); sdterm renders it as text either way.
* ``extra_networks(prompt)`` -> ``(prompt without the tags, [NetworkTag, ...])``: A1111's
  ``<lora:NAME:W>`` tags (``modules/extra_networks.py``), removed from the text CLIP sees.

Where A1111 itself is not deterministic (its Earley parser breaks some ties by hash order, so
``[a:3]]`` is scheduled in some Python processes and plain text in others) this module always
takes the scheduled reading. Where A1111 raises (``(x:1.2.3)``: a weight ``float()`` cannot read)
the colon is read as text instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BREAK", "NetworkTag", "extra_networks", "lora_tag", "parse_attention", "schedules", "split_and"]

BREAK = "BREAK"
ROUND = 1.1
SQUARE = 1 / 1.1

_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_WEIGHT_RE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_AND_RE = re.compile(r"\bAND\b")
_SPECIAL = "\\()[]:"


# --------------------------------------------------------------------------------------- emphasis

def parse_attention(text: str) -> list[tuple[str, float]]:
    """The (text, weight) runs of ``text``; ``("BREAK", -1.0)`` marks a chunk break."""
    pieces: list[list] = []          # [text, weight], weights multiplied as brackets close
    opens: dict[str, list[int]] = {"(": [], "[": []}

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def add_text(run: str) -> None:
        for k, part in enumerate(_BREAK_RE.split(run)):
            if k:
                pieces.append([BREAK, -1.0])
            pieces.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1:i + 2]
            if nxt and nxt in "()[]\\":
                pieces.append([nxt, 1.0])
                i += 2
            else:                     # a lone backslash is dropped
                pieces.append(["", 1.0])
                i += 1
        elif c in "([":
            opens[c].append(len(pieces))
            i += 1
        elif c == ":":
            m = _WEIGHT_RE.match(text, i)
            weight = _to_float(m.group(1)) if m else None
            if m and weight is not None and opens["("]:
                scale(opens["("].pop(), weight)
                i = m.end()
            elif m and weight is not None:   # ":1.2)" with nothing open is text, whole
                add_text(m.group(0))
                i = m.end()
            else:
                add_text(":")
                i += 1
        elif c == ")" and opens["("]:
            scale(opens["("].pop(), ROUND)
            i += 1
        elif c == "]" and opens["["]:
            scale(opens["["].pop(), SQUARE)
            i += 1
        elif c in ")]":
            add_text(c)
            i += 1
        else:
            j = i
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in opens["("]:
        scale(start, ROUND)
    for start in opens["["]:
        scale(start, SQUARE)
    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, w) for t, w in merged]


def _to_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- AND

def split_and(prompt: str) -> tuple[str, bool]:
    """``(prompt, True)`` when A1111 would split it on ``AND`` (composable diffusion)."""
    return prompt, _AND_RE.search(prompt) is not None


# ----------------------------------------------------------------------------- extra networks

_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<lora:NAME:...>`` tag, read as A1111's ``ExtraNetworkLora.activate`` reads it:
    ``<lora:N>`` weighs 1 on both models, ``<lora:N:W>`` W on both, ``<lora:N:Wte:Wunet>`` the
    text encoder first; ``te=``, ``unet=`` and ``dyn=`` (the rank kept) override; the U-Net
    takes the text encoder's weight (``te=`` included) unless given."""

    kind: str
    """``lora`` (A1111's ``lyco`` is the same network type)."""
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    text: str = ""
    """The tag as written."""


class NetworkTagError(ValueError):
    """A tag whose weights can't be read; one line."""


def extra_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """The prompt without its ``<kind:...>`` tags (nothing put in their place, as A1111) and the
    LoRA tags in order. Tags of other kinds (hypernetworks) are removed and returned too, with
    their kind, for the caller to report. :class:`NetworkTagError` for a weight that isn't a number."""
    tags: list[NetworkTag] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        tags.append(_read_tag("lora" if kind == "lyco" else kind, args, m.group(0)))
        return ""

    return _NETWORK_RE.sub(take, prompt), tags


def _read_tag(kind: str, args: str, text: str) -> NetworkTag:
    items = args.split(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""

    def number(value: str, what: str, cast=float):
        try:
            out = cast(value.strip())
        except ValueError:
            out = None
        if out is None or out != out or out in (float("inf"), float("-inf")):
            raise NetworkTagError(f"{text}: the {what} {value.strip()!r} is not a number")
        return out

    te = number(positional[1], "text-encoder weight") if len(positional) > 1 else 1.0
    te = number(named["te"], "te=") if "te" in named else te
    unet = number(positional[2], "U-Net weight") if len(positional) > 2 else te
    unet = number(named["unet"], "unet=") if "unet" in named else unet
    dyn = number(positional[3], "dyn", int) if len(positional) > 3 else None
    dyn = number(named["dyn"], "dyn=", int) if "dyn" in named else dyn
    return NetworkTag(kind, name, te, unet, dyn, text)


def lora_tag(name: str, weight: float) -> str:
    """The tag ``--lora NAME:W`` adds to a prompt."""
    return f"<lora:{name}:{weight:g}>"


# ------------------------------------------------------------------------------------ scheduling

@dataclass
class _Sched:
    before: list | None
    after: list
    when: str


@dataclass
class _Alt:
    options: list


class _Reject(Exception):
    """The prompt is outside A1111's scheduling grammar."""


_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_SPACE_RE = re.compile(r"\s*")


class _Parser:
    """Recursive descent over A1111's grammar: a prompt is text, whitespace, ``(p)``, ``(p:p)``,
    ``[p]``, ``[p:p:N]``, ``[p:N]``, ``[p|p|...]``; at the top level a bracket or colon that fits
    none of these is kept as text."""

    def __init__(self, text: str) -> None:
        self.s = text

    def top(self) -> list:
        nodes: list = []
        pos = 0
        while pos < len(self.s):
            got, pos2 = self.prompt(pos)
            nodes += got
            if pos2 == len(self.s):
                break
            c = self.s[pos2]
            if c in "()[]:":
                nodes.append(c)
                pos = pos2 + 1
            else:                                  # "|" outside alternation, or a bad escape
                raise _Reject
        return nodes

    def prompt(self, pos: int) -> tuple[list, int]:
        nodes: list = []
        s = self.s
        while pos < len(s):
            c = s[pos]
            if c in ")]:|":
                break
            if c in "([":
                got = (self.paren if c == "(" else self.square)(pos)
                if got is None:
                    break
                node, pos = got
                nodes.append(node)
                continue
            start = pos
            while pos < len(s) and s[pos] not in "()[]:|":
                if s[pos] == "\\":
                    if pos + 1 >= len(s) or s[pos + 1] == "\n":
                        break
                    pos += 1
                pos += 1
            if pos == start:
                break
            nodes.append(s[start:pos])
        return nodes, pos

    def paren(self, pos: int):
        inner, pos = self.prompt(pos + 1)
        if self._at(pos, ")"):
            return ["(", *inner, ")"], pos + 1
        if self._at(pos, ":"):
            second, pos = self.prompt(pos + 1)
            if self._at(pos, ")"):
                return ["(", *inner, ":", *second, ")"], pos + 1
        return None

    def square(self, pos: int):
        first, pos = self.prompt(pos + 1)
        if self._at(pos, "]"):
            return ["[", *first, "]"], pos + 1
        if self._at(pos, "|"):
            options = [first]
            while self._at(pos, "|"):
                option, pos = self.prompt(pos + 1)
                options.append(option)
            if self._at(pos, "]"):
                return _Alt(options), pos + 1
            return None
        if not self._at(pos, ":"):
            return None
        when = self.when(pos + 1)
        if when is not None:
            return _Sched(None, first, when[0]), when[1]
        second, pos = self.prompt(pos + 1)
        if self._at(pos, ":"):
            when = self.when(pos + 1)
            if when is not None:
                return _Sched(first, second, when[0]), when[1]
        return None

    def when(self, pos: int):
        """``[space] NUMBER [space] ]`` at pos: (number text, position after the bracket)."""
        pos = _SPACE_RE.match(self.s, pos).end()
        m = _NUMBER_RE.match(self.s, pos)
        if not m:
            return None
        end = _SPACE_RE.match(self.s, m.end()).end()
        return (m.group(0), end + 1) if self._at(end, "]") else None

    def _at(self, pos: int, c: str) -> bool:
        return pos < len(self.s) and self.s[pos] == c


def schedules(prompt: str, steps: int, hires_steps: int | None = None,
              use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """A1111's ``get_learned_conditioning_prompt_schedules`` for one prompt: ``[(end_step, text)]``,
    each text used for the steps up to and including its end_step (1-based)."""
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, steps
    else:
        int_offset, flt_offset, total = steps, 1.0, hires_steps
    try:
        tree = _Parser(prompt).top()
        ends = {total}
        _resolve(tree, ends, total, int_offset, flt_offset, use_old_scheduling)
        return [(end, _render(tree, end)) for end in sorted(ends)]
    except (_Reject, RecursionError):
        return [(total, prompt)]


def _resolve(nodes: list, ends: set, total: int, int_offset: int, flt_offset: float, old: bool) -> None:
    """Turn each schedule's number into the last step of its first part; collect the step ends."""
    for node in nodes:
        if isinstance(node, _Sched):
            v = float(node.when)
            if old:
                v = v * total if v < 1 else v
            elif "." in node.when:
                v = (v - flt_offset) * total
            else:
                v = v - int_offset
            node.when = min(total, int(v))
            if node.when >= 1:
                ends.add(node.when)
            branches = [node.before or [], node.after]
        elif isinstance(node, _Alt):
            ends.update(range(1, total + 1))
            branches = node.options
        elif isinstance(node, list):
            branches = [node]
        else:
            continue
        for branch in branches:
            _resolve(branch, ends, total, int_offset, flt_offset, old)


def _render(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Sched):
            out.append(_render(node.before or [], step) if step <= node.when else _render(node.after, step))
        elif isinstance(node, _Alt):
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
        else:
            out.append(_render(node, step))
    return "".join(out)
