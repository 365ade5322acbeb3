"""sdterm.prompt_syntax: A1111's prompt language (emphasis, BREAK, scheduling, alternation, AND).

Expected values are A1111's (modules/prompt_parser.py, stable-diffusion-webui 1.10, lark 1.1.2):
its doctests, plus cases written from its rules and checked against its functions."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdterm.prompt_syntax import parse_attention, schedules, split_and


# ----------------------------------------------------------------------------------- emphasis

ATTENTION_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

ATTENTION_CASES = [
    ('', [('', 1.0)]),
    ('   ', [('   ', 1.0)]),
    ('plain words', [('plain words', 1.0)]),
    ('(x)', [('x', 1.1)]),
    ('[x]', [('x', 0.9090909090909091)]),
    ('((x))', [('x', 1.2100000000000002)]),
    ('[[x]]', [('x', 0.8264462809917354)]),
    ('(x:1.3)', [('x', 1.3)]),
    ('(x: 1.3 )', [('x', 1.3)]),
    ('(x:1.)', [('x', 1.0)]),
    ('(x:.5)', [('x', 0.5)]),
    ('(x:-1)', [('x', -1.0)]),
    ('(x:+2)', [('x', 2.0)]),
    ('(x:0)', [('x', 0.0)]),
    ('((x:2))', [('x', 2.2)]),
    ('([x])', [('x', 1.0)]),
    ('[(x)]', [('x', 1.0)]),
    ('(x:1e3)', [('x:1e3', 1.1)]),
    ('(a (b) c)', [('a ', 1.1), ('b', 1.2100000000000002), (' c', 1.1)]),
    ('(unclosed', [('unclosed', 1.1)]),
    ('[unclosed', [('unclosed', 0.9090909090909091)]),
    ('((a) b', [('a', 1.2100000000000002), (' b', 1.1)]),
    ('unmatched)', [('unmatched)', 1.0)]),
    ('unmatched]', [('unmatched]', 1.0)]),
    ('a ) b ] c', [('a ) b ] c', 1.0)]),
    ('x:1.5)', [('x:1.5)', 1.0)]),
    ('a: b', [('a: b', 1.0)]),
    ('(a:b)', [('a:b', 1.1)]),
    ('\\(x\\)', [('(x)', 1.0)]),
    ('\\[x\\]', [('[x]', 1.0)]),
    ('\\\\', [('\\', 1.0)]),
    ('a\\b', [('ab', 1.0)]),
    ('\\', [('', 1.0)]),
    ('(x\\)', [('x)', 1.1)]),
    ('\\((x)', [('(', 1.0), ('x', 1.1)]),
    ('BREAK', [('', 1.0), ('BREAK', -1), ('', 1.0)]),
    ('a BREAK b', [('a', 1.0), ('BREAK', -1), ('b', 1.0)]),
    ('a BREAK BREAK b', [('a', 1.0), ('BREAK', -1), ('', 1.0), ('BREAK', -1), ('b', 1.0)]),
    ('BREAKBREAK', [('BREAKBREAK', 1.0)]),
    ('aBREAK b', [('aBREAK b', 1.0)]),
    ('a BREAKb', [('a BREAKb', 1.0)]),
    ('a break b', [('a break b', 1.0)]),
    ('(BREAK)', [('', 1.1), ('BREAK', -1.1), ('', 1.1)]),
    ('[BREAK]', [('', 0.9090909090909091), ('BREAK', -0.9090909090909091), ('', 0.9090909090909091)]),
    ('(a BREAK b:1.0)', [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]),
    ('a,BREAK,b', [('a,', 1.0), ('BREAK', -1), (',b', 1.0)]),
    ('a:BREAK', [('a:', 1.0), ('BREAK', -1), ('', 1.0)]),
    ('a\nBREAK\nb', [('a', 1.0), ('BREAK', -1), ('b', 1.0)]),
    ('(a)(b)', [('ab', 1.1)]),
    ('(a)[b]', [('a', 1.1), ('b', 0.9090909090909091)]),
    ('[a] (b:0.5) c', [('a', 0.9090909090909091), (' ', 1.0), ('b', 0.5), (' c', 1.0)]),
    ('(a [b] c)', [('a ', 1.1), ('b', 1.0), (' c', 1.1)]),
    ('(x:1.5)(y:1.5)', [('xy', 1.5)]),
    ('(a:2) and (b:1)', [('a', 2.0), (' and b', 1.0)]),
    ('([x]:2)', [('x', 1.8181818181818181)]),
    ('a (b:3', [('a ', 1.0), ('b:3', 1.1)]),
    ('(a:b:2)', [('a:b', 2.0)]),
    ('x((y)', [('x', 1.0), ('y', 1.2100000000000002)]),
]


@pytest.mark.parametrize("text, expected", ATTENTION_DOCTESTS + ATTENTION_CASES)
def test_parse_attention(text, expected):
    got = parse_attention(text)
    assert got == expected
    assert [type(t) for t, _ in got] == [str] * len(got)


def test_break_inside_brackets_is_no_longer_a_plain_break():
    """A1111's chunker only breaks on ("BREAK", -1): inside brackets the marker is scaled like text."""
    assert ("BREAK", -1.0) not in parse_attention("(BREAK)")
    assert ("BREAK", -1.0) in parse_attention("(BREAK:1)")


def test_bad_weight_does_not_raise():
    """A1111 raises ValueError on float('1.2.3'); here the colon is text and the paren closes ×1.1."""
    assert parse_attention("(x:1.2.3)") == [("x:1.2.3", 1.1)]
    assert parse_attention("(x:.)") == [("x:.", 1.1)]


def strip_markup(text: str) -> str:
    """For text without backslashes, colons or BREAK: openers always vanish, closers vanish when
    something of their kind is open, everything else is kept."""
    out, depth = [], {"(": 0, "[": 0}
    for c in text:
        if c in "([":
            depth[c] += 1
        elif c in ")]" and depth["(" if c == ")" else "["]:
            depth["(" if c == ")" else "["] -= 1
        else:
            out.append(c)
    return "".join(out)


@given(st.one_of(st.text(), st.text(alphabet="ab ()[]:\\.+-19\n")))
@settings(max_examples=600, deadline=None)
def test_parse_attention_never_raises(text):
    got = parse_attention(text)
    assert got and all(isinstance(t, str) and isinstance(w, float) for t, w in got)
    assert all(a[1] != b[1] for a, b in pairwise(got))      # neighbours with equal weight merged


@given(st.text(alphabet="ab ,()[]\n\u00e9"))
@settings(max_examples=400, deadline=None)
def test_parse_attention_keeps_the_text(text):
    got = parse_attention(text)
    assert "".join(t for t, _ in got) == strip_markup(text)
    if not re.search(r"[()\[\]]", text):
        assert got == [(text, 1.0)]


# --------------------------------------------------------------------------------- scheduling

SCHEDULE_DOCTESTS = [  # A1111's doctests, steps=10
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but
    # since "|" left its plain-text rule the grammar rejects the prompt and its function returns this:
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_DOCTESTS)
def test_schedule_doctests(prompt, expected):
    assert schedules(prompt, 10) == expected


SCHEDULE_CASES = [
    ('a [b:c:0.5] d', 4, [(2, 'a b d'), (4, 'a c d')]),
    ('[a:b:3]', 10, [(3, 'a'), (10, 'b')]),
    ('[a:b:0.25]', 8, [(2, 'a'), (8, 'b')]),
    ('[a:b:1.0]', 10, [(10, 'a')]),
    ('[a:b:1]', 10, [(1, 'a'), (10, 'b')]),
    ('[a:b:0]', 10, [(10, 'b')]),
    ('[a:b:-2]', 10, [(10, 'b')]),
    ('[a:b:25]', 10, [(10, 'a')]),
    ('[a:b:0.05]', 10, [(10, 'b')]),
    ('[a:b:1e1]', 20, [(10, 'a'), (20, 'b')]),
    ('[a::3]', 10, [(3, 'a'), (10, '')]),
    ('[a: :3]', 10, [(3, 'a'), (10, ' ')]),
    ('[:b:3]', 10, [(3, ''), (10, 'b')]),
    ('[ a : b : 3 ]', 10, [(3, ' a '), (10, ' b ')]),
    ('[a:b: 3 ]', 10, [(3, 'a'), (10, 'b')]),
    ('[a:b:+3]', 10, [(3, 'a'), (10, 'b')]),
    ('[a:b:3.5.5]', 10, [(10, '[a:b:3.5.5]')]),
    ('[a:b:c:3]', 10, [(10, '[a:b:c:3]')]),
    ('[a:3:4]', 10, [(4, 'a'), (10, '3')]),
    ('a|b', 10, [(10, 'a|b')]),
    ('[a|b', 10, [(10, '[a|b')]),
    ('(a|b)', 10, [(10, '(a|b)')]),
    ('[a|b|c]', 5, [(1, 'a'), (2, 'b'), (3, 'c'), (4, 'a'), (5, 'b')]),
    ('[a|b] [c|d|e]', 6, [(1, 'a c'), (2, 'b d'), (3, 'a e'), (4, 'b c'), (5, 'a d'), (6, 'b e')]),
    ('[a|[b|c]]', 6, [(1, 'a'), (2, 'c'), (3, 'a'), (4, 'c'), (5, 'a'), (6, 'c')]),
    ('[a:[b|c]:3]', 5, [(1, 'a'), (2, 'a'), (3, 'a'), (4, 'c'), (5, 'b')]),
    ('[|]', 3, [(1, ''), (2, ''), (3, '')]),
    ('([a|b]:2)', 4, [(1, '(a:2)'), (2, '(b:2)'), (3, '(a:2)'), (4, '(b:2)')]),
    ('[[a|b]:c:3]', 6, [(1, 'a'), (2, 'b'), (3, 'a'), (4, 'c'), (5, 'c'), (6, 'c')]),
    ('(a:[b:3])', 10, [(3, '(a:)'), (10, '(a:b)')]),
    ('\\[a:b:3\\]', 10, [(10, '\\[a:b:3\\]')]),
    ('[a\\:b:3]', 10, [(3, ''), (10, 'a\\:b')]),
    ('[a\\]:3]', 10, [(3, ''), (10, 'a\\]')]),
    ('[a:3] \\', 10, [(10, '[a:3] \\')]),
    ('[a:3] x|y', 10, [(10, '[a:3] x|y')]),
    ('[a:3] (x|y)', 10, [(10, '[a:3] (x|y)')]),
    ('[a|b] c|d', 10, [(10, '[a|b] c|d')]),
    ('[a:3] x\\\ny', 10, [(10, '[a:3] x\\\ny')]),
    ('[a:3', 10, [(10, '[a:3')]),
    ('[[a:3]', 10, [(3, '['), (10, '[a')]),
    ('[a:b:3] x [c:d:7]', 10, [(3, 'a x c'), (7, 'b x c'), (10, 'b x d')]),
    ('[a:b:3][c:d:3]', 10, [(3, 'ac'), (10, 'bd')]),
    ('[a:b:.5]', 3, [(1, 'a'), (3, 'b')]),
    ('', 10, [(10, '')]),
    ('[a: b]', 10, [(10, '[a: b]')]),
    ('a [b] (c) [d:e:2]', 4, [(2, 'a [b] (c) d'), (4, 'a [b] (c) e')]),
    ('[fe|]male', 4, [(1, 'female'), (2, 'male'), (3, 'female'), (4, 'male')]),
    ('[a:b:5]', 2, [(2, 'a')]),
    ('(a) [b:3] )', 10, [(3, '(a)  )'), (10, '(a) b )')]),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_CASES)
def test_schedules(prompt, steps, expected):
    assert schedules(prompt, steps) == expected


HIRES_CASES = [  # the first two are A1111's doctests (base 10, hires 10)
    ('a [b:.5] c', 10, 10, [(10, 'a b c')]),
    ('a [b:1.5] c', 10, 10, [(5, 'a  c'), (10, 'a b c')]),
    ('a [b:15] c', 10, 10, [(5, 'a  c'), (10, 'a b c')]),
    ('a [b:5] c', 10, 10, [(10, 'a b c')]),
    ('a [b:c:12] d', 10, 20, [(2, 'a b d'), (20, 'a c d')]),
]


@pytest.mark.parametrize("prompt, base, hires, expected", HIRES_CASES)
def test_hires_schedules(prompt, base, hires, expected):
    assert schedules(prompt, base, hires) == expected


OLD_SCHEDULING = [  # "use old scheduling": a number below 1 is a fraction, anything else a step
    ('a [b:c:0.5] d', [(5, 'a b d'), (10, 'a c d')]),
    ('a [b:c:1.0] d', [(1, 'a b d'), (10, 'a c d')]),
    ('a [b:c:3] d', [(3, 'a b d'), (10, 'a c d')]),
    ('a [b:c:1] d', [(1, 'a b d'), (10, 'a c d')]),
]


@pytest.mark.parametrize("prompt, expected", OLD_SCHEDULING)
def test_old_scheduling(prompt, expected):
    assert schedules(prompt, 10, use_old_scheduling=True) == expected


def test_hash_dependent_case_takes_the_scheduled_reading():
    """A1111's Earley parser breaks this tie by hash order (PYTHONHASHSEED); we always schedule."""
    assert schedules("[a:3]]", 10) == [(3, "]"), (10, "a]")]


def test_deep_nesting_does_not_raise():
    prompt = "[" * 5000 + "a:3" + "]" * 5000
    assert schedules(prompt, 10)[-1][0] == 10


@given(st.text(alphabet="ab [](): |\\\n.13-"), st.integers(1, 30))
@settings(max_examples=400, deadline=None)
def test_schedules_shape(prompt, steps):
    got = schedules(prompt, steps)
    ends = [e for e, _ in got]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
    if "[" not in prompt:
        assert got == [(steps, prompt)]


# ------------------------------------------------------------------------------------------ AND

@pytest.mark.parametrize("prompt, has_and", [
    ("a cat AND a dog", True),
    ("a cat AND a dog :1.5", True),
    ("AND", True),
    ("cat,AND,dog", True),
    ("a cat\nAND\na dog", True),
    ("a cat and a dog", False),
    ("a cat ANDROID", False),
    ("BRANDAND", False),
    ("AND_", False),
    ("", False),
])
def test_split_and(prompt, has_and):
    assert split_and(prompt) == (prompt, has_and)
