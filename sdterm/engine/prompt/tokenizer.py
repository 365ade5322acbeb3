"""The CLIP tokenizer and where its files are found; plain 75-token chunking.

``PromptTokenizer(text)`` splits a text's ids into 75-token chunks (BOS + 75 + EOS/padding), the
plain chunking used for token counts. What a render encodes is A1111's chunking of the parsed
prompt (weights, BREAK, the comma backtrack): ``conditioning.chunk_prompt``, which asks this
tokenizer for each fragment's ids (``ids``) and the special ids (``specials``), both memoized.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from ..loading.checkpoint import CheckpointError

TOKENIZER_REPO = "openai/clip-vit-large-patch14"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MAX_CHUNKS = 8  # 600 prompt tokens
MEMO_TEXTS = 1000
"""Texts remembered per tokenizer in the token memo (the oldest are dropped beyond it)."""


class PromptError(ValueError):
    """A prompt can't be encoded; one line for the user."""


def tokenizer_dir_candidates(model_path: Path | None, data_dir: Path | None) -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("SDTERM_TOKENIZER")
    if env:
        out.append(Path(env).expanduser())
    if model_path is not None:
        base = model_path if model_path.is_dir() else model_path.parent
        out.append(base / "tokenizer")
    if data_dir is not None:
        out.append(data_dir / "tokenizers" / TOKENIZER_REPO.split("/")[-1])
    return out


def find_tokenizer(model_path: Path | None, data_dir: Path | None) -> Path | None:
    for cand in tokenizer_dir_candidates(model_path, data_dir):
        if all((cand / f).is_file() for f in TOKENIZER_FILES):
            return cand
    return None


def manual_fix(target: Path) -> str:
    """The manual workaround, naming the files and where they go."""
    files = " and ".join(TOKENIZER_FILES)
    return (f"copy {files} from https://huggingface.co/{TOKENIZER_REPO} (or from a machine where "
            f"`sdterm download` ran) into {target}, or set SDTERM_TOKENIZER to a folder holding them")


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why the hub can't be reached now, in a few words, or None when it may be: HF_HUB_OFFLINE,
    else one DNS look-up and one TCP connection (to the HTTPS proxy, where one is set), with no
    retries, so an offline machine is told at once instead of after huggingface_hub's backoff."""
    import socket
    import urllib.request
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true"):
        return "HF_HUB_OFFLINE is set"
    hub = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target = hub
    proxy = urllib.request.getproxies().get(hub.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(hub.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return f"cannot resolve {host} (offline?)"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({getattr(exc, 'strerror', None) or exc})"
    return None


def fetch_tokenizer(data_dir: Path) -> Path:
    """Download the standard CLIP tokenizer files once (needs internet; never at import or in
    tests). Offline, fail at once with the manual workaround (no retries)."""
    target = data_dir / "tokenizers" / TOKENIZER_REPO.split("/")[-1]
    missing = f"the CLIP tokenizer is not on this machine ({', '.join(TOKENIZER_FILES)})"
    why = offline_reason()
    if why:
        raise CheckpointError(f"{missing} and cannot be downloaded: {why}; {manual_fix(target)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise CheckpointError(f"{missing} and huggingface_hub is not installed; {manual_fix(target)}") from None
    target.mkdir(parents=True, exist_ok=True)
    try:
        for name in TOKENIZER_FILES:
            hf_hub_download(TOKENIZER_REPO, name, local_dir=target)
    except Exception as exc:
        raise CheckpointError(
            f"{missing} and could not be downloaded ({type(exc).__name__}); {manual_fix(target)}"
        ) from None
    return target


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table used by byte-level BPE (the
    demo tokenizer is written with it, :meth:`PromptTokenizer.decode` reads tokens back with it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""CLIP's word pattern: the special tokens, English contractions, runs of letters, single digits,
runs of anything else but whitespace."""


def clip_bpe(folder: Path):
    """CLIP's byte-level BPE from ``folder``'s vocab.json and merges.txt, with HF tokenizers, put
    together as transformers' CLIPTokenizer (5.x) puts it: NFC, whitespace runs to one space and
    lowercase; CLIP's word pattern, then bytes to printable characters; ``</w>`` ends a word; the
    two special tokens matched whole, never normalized. tests/test_tokenizer_bpe.py holds its ids to
    CLIPTokenizer's. Importing tokenizers takes milliseconds, transformers seconds."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    bpe = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    return tok


class PromptTokenizer:
    """The CLIP tokenizer of ``folder`` (:func:`clip_bpe`), loaded on the first text not in the
    token memo: with ``memo`` (a folder), each text's ids are remembered per tokenizer identity."""

    def __init__(self, folder: Path, max_positions: int = 77, memo: Path | None = None):
        self.folder = folder
        self.max_positions = max_positions
        h = hashlib.sha256()
        try:
            for name in TOKENIZER_FILES:
                h.update((folder / name).read_bytes())
        except OSError as exc:
            raise CheckpointError(f"{folder}: not a usable CLIP tokenizer ({exc.strerror or exc})") from None
        self.identity = f"clip-bpe:{h.hexdigest()}"
        """Changes whenever the vocabulary or merges do (part of the embedding cache key)."""
        self._tok = None
        self._bytes: dict[int, bytes] | None = None
        self._lock = threading.RLock()  # the app tokenizes for its token line while a render runs
        self._memo_file = memo / f"{h.hexdigest()[:24]}.json" if memo is not None else None
        self._memo: dict | None = None

    @property
    def tok(self):
        """The BPE tokenizer (:func:`clip_bpe`), loaded on first use."""
        if self._tok is None:
            try:
                tok = clip_bpe(self.folder)
                vocab = tok.get_vocab(with_added_tokens=False)
                if BOS not in vocab or EOS not in vocab:
                    raise ValueError(f"no {BOS} or {EOS} in vocab.json")
                self._tok = tok
            except Exception as exc:
                detail = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{self.folder}: not a usable CLIP tokenizer ({detail})") from None
        return self._tok

    def _specials(self) -> list[int]:
        tok = self.tok
        eos = tok.token_to_id(EOS)
        comma = tok.token_to_id(",</w>")  # A1111's comma token (-1: the vocabulary has none)
        return [tok.token_to_id(BOS), eos, eos, -1 if comma is None else comma]  # CLIP pads with its EOS

    def _ids(self, text: str) -> tuple[list[int], list[int]]:
        """(the text's ids without BOS/EOS, [bos, eos, pad, comma]): from the memo, else the tokenizer."""
        with self._lock:
            return self._ids_locked(text)

    def _ids_locked(self, text: str) -> tuple[list[int], list[int]]:
        memo = self._load_memo()
        if text in memo["texts"] and len(memo["specials"]) == 4:
            return memo["texts"][text], memo["specials"]
        ids = list(self.tok.encode(text, add_special_tokens=False).ids)
        memo["specials"] = self._specials()
        memo["texts"][text] = ids
        self._save_memo(memo)
        return ids, memo["specials"]

    def _load_memo(self) -> dict:
        if self._memo is None:
            self._memo = {"specials": [], "texts": {}}
            if self._memo_file is not None:
                import json

                try:
                    data = json.loads(self._memo_file.read_text(encoding="utf-8"))
                    if data.get("identity") == self.identity and isinstance(data.get("texts"), dict):
                        self._memo = {"specials": list(data.get("specials") or []), "texts": data["texts"]}
                except (OSError, ValueError, AttributeError):
                    pass  # no memo (or a torn one): tokenize, and write a fresh one
        return self._memo

    def _save_memo(self, memo: dict) -> None:
        if self._memo_file is None:
            return
        import json

        from ...fsutil import atomic_write_bytes

        texts = memo["texts"]
        while len(texts) > MEMO_TEXTS:  # the oldest first
            del texts[next(iter(texts))]
        data = {"identity": self.identity, "specials": memo["specials"], "texts": texts}
        try:
            atomic_write_bytes(self._memo_file, json.dumps(data).encode("utf-8"))
        except OSError:
            pass  # a memo is an optimisation only

    def ids(self, text: str) -> list[int]:
        """``text``'s ids without BOS/EOS (A1111's ``tokenize``: no truncation), memoized."""
        return list(self._ids(text)[0])

    def decode(self, ids) -> str:
        """The text ``ids`` stand for, a space after each word's last token (CLIP's ``</w>``):
        what a token display shows. Read from vocab.json (no transformers import); an id the
        vocabulary lacks reads as ``?``."""
        if self._bytes is None:
            import json

            try:
                vocab = json.loads((self.folder / "vocab.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{self.folder}: not a usable CLIP tokenizer ({exc})") from None
            decode = {c: b for b, c in bytes_to_unicode().items()}
            table = {}
            for token, i in vocab.items():
                end = token.endswith("</w>")
                table[int(i)] = bytes(decode.get(ch, 63) for ch in (token[:-4] if end else token)) + (b" " if end else b"")
            self._bytes = table
        return b"".join(self._bytes.get(int(i), b"?") for i in ids).decode("utf-8", "replace")

    def specials(self) -> tuple[int, int, int, int]:
        """(BOS, EOS, padding, comma) ids; comma is -1 where the vocabulary lacks ``,</w>``. From the
        memo once any text has been tokenized (no transformers import)."""
        memo = self._load_memo()
        if len(memo["specials"]) != 4:
            memo["specials"] = self._specials()
            self._save_memo(memo)
        bos, eos, pad, comma = memo["specials"]
        return bos, eos, pad, comma
