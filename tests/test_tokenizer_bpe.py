"""sdterm tokenizes prompts with HF tokenizers directly (prompt/tokenizer.py: clip_bpe), put
together as transformers' CLIPTokenizer puts it, so that a first start or the app's token count
needs no transformers import: its ids, and the special ids, must be CLIPTokenizer's."""

from __future__ import annotations

import json
import random

import pytest

from sdterm.engine.loading.checkpoint import CheckpointError
from sdterm.engine.loading.demo import demo_vocab
from sdterm.engine.prompt.tokenizer import PromptTokenizer, clip_bpe

TEXTS = [
    "a red fox", "A  Red\tFOX\n in the   snow", "(castle:1.2) [snow|rain] BREAK <lora:x:0.5> {a|b}",
    "café naïve Ωmega 日本語 🦊 e\u0301 ﬁne", "<|endoftext|> x <|ENDOFTEXT|><|startoftext|>y",
    "it's we're they'll I'd you've IT'S", "1234 3.5 1,000,000 #hashtag @user", "", "   ", "a,b,,c...!? -- __",
    "masterpiece, best quality, ((ultra-detailed)), (illustration:1.1), 8k, highres " * 6,
    "\u200b\u00a0\u3000zero width and nbsp", "tab\tnew\nline\r\nreturn", "ÀÉÎÕÜ ß ẞ İ",
]


def fuzz(n: int = 300, seed: int = 0) -> list[str]:
    """Random mixtures of letters, digits, punctuation, whitespace, accents, emoji and CJK."""
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", ",.;:!?()[]{}<>|\\/'\"-_=+*&^%$#@~`",
             " \t\n  ", "éèêëàâäöüçñåøæœÉÀ", "🦊🌸✨🔥", "日本語中文한국어", "'s'll're"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A CLIP-style vocabulary with a thousand learned merges (vocab.json + merges.txt)."""
    vocab, merges = demo_vocab(n_merges=1000)
    d = tmp_path_factory.mktemp("bpe")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return d


def test_ids_are_clip_tokenizers(folder):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(folder))
    ours = clip_bpe(folder)
    texts = TEXTS + fuzz()
    got = [ours.encode(t, add_special_tokens=False).ids for t in texts]
    want = [ref(t, add_special_tokens=False, truncation=False)["input_ids"] for t in texts]
    diff = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not diff, diff[:3]
    assert sum(len(g) > 1 for g in got) > 200 and max(len(g) for g in got) > 60  # real work was compared


def test_specials_are_clip_tokenizers(folder, tmp_path):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(folder))
    comma = ref.get_vocab().get(",</w>", -1)
    assert PromptTokenizer(folder).specials() == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, comma)


def test_a_folder_that_is_not_a_clip_tokenizer_is_one_line(folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (broken / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(CheckpointError, match="not a usable CLIP tokenizer") as info:
        PromptTokenizer(broken).ids("a b")
    assert "\n" not in str(info.value)
    (broken / "merges.txt").write_text("#version: 0.2\nthis line has three\n")
    with pytest.raises(CheckpointError, match="not a usable CLIP tokenizer"):
        PromptTokenizer(broken).ids("a b")


def test_tokenizing_imports_no_transformers(folder):
    import subprocess
    import sys

    probe = ("import sys; from pathlib import Path; from sdterm.engine.prompt.tokenizer import PromptTokenizer; "
             f"t = PromptTokenizer(Path({str(folder)!r})); assert t.ids('a red fox') and t.specials(); "
             "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
