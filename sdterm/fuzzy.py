"""Fuzzy matching for the history search (Ctrl+R): how well a typed needle matches a prompt."""

from __future__ import annotations


def word_start(text: str, i: int) -> bool:
    return i == 0 or (text[i].isalnum() and not text[i - 1].isalnum())


def match_rank(needle: str, text: str) -> tuple[int, float] | None:
    """(tier, score) of ``needle`` in ``text`` (both lower case), or None if it does not match.
    Tier 0: prefix; 1: substring at a word start; 2: substring; 3: subsequence. Higher scores first."""
    if text.startswith(needle):
        return 0, 0.0
    at = text.find(needle)
    if at >= 0:
        while at >= 0:
            if word_start(text, at):
                return 1, 0.0
            at = text.find(needle, at + 1)
        return 2, 0.0
    letters = needle.replace(" ", "")
    it = iter(text)
    if not all(c in it for c in letters):
        return None
    return 3, subsequence_score(letters, text)


_GAP = 0.01


def subsequence_score(needle: str, text: str) -> float:
    """Best alignment of ``needle`` as a subsequence of ``text``: a letter on a word start scores
    3, a letter right after the previous matched one 2, any other letter 0, less 0.01 for each
    letter skipped between two matches (so a tighter match wins a tie). Dynamic programming over
    the positions where each letter occurs, fast enough for every keystroke over thousands of prompts."""
    where: dict[str, list[int]] = {}
    for j, ch in enumerate(text):
        where.setdefault(ch, []).append(j)
    # prev: (position, best score of needle[:i] ending with needle[i-1] at that position), by position
    prev = [(j, 3.0 if word_start(text, j) else 0.0) for j in where.get(needle[0], ())]
    for c in needle[1:]:
        by_pos = dict(prev)
        cur: list[tuple[int, float]] = []
        best_before = float("-inf")  # max over earlier positions k <= j - 2 of score + GAP * k
        k = 0
        for j in where.get(c, ()):
            while k < len(prev) and prev[k][0] <= j - 2:
                best_before = max(best_before, prev[k][1] + _GAP * prev[k][0])
                k += 1
            options = [best_before - _GAP * (j - 1)]  # skipping the j - k - 1 letters between
            if j - 1 in by_pos:
                options.append(by_pos[j - 1] + 2.0)  # right after the previous letter
            best = max(options)
            if best > float("-inf"):
                cur.append((j, best + (3.0 if word_start(text, j) else 0.0)))
        prev = cur
    return max((score for _, score in prev), default=0.0)
