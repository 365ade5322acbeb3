"""The CLIP tokenizer and A1111-style prompt chunking; where the tokenizer files are found.

Prompts longer than 75 tokens are split into 75-token chunks; each chunk is encoded as its own
77-token window (BOS + 75 + EOS/padding) and the encoder's hidden states are concatenated along
the token axis, so nothing the user typed is cut off. (The A1111 prompt language, weights and
scheduling, belongs in this package too.)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..loading.checkpoint import CheckpointError

TOKENIZER_REPO = "openai/clip-vit-large-patch14"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
MAX_CHUNKS = 8  # 600 prompt tokens


class PromptError(ValueError):
    """A prompt can't be encoded; one line for the user."""


@dataclass(frozen=True)
class Tokens:
    chunks: tuple[tuple[int, ...], ...]
    """One tuple of ``max_positions`` ids per chunk (BOS, up to 75 ids, EOS, padding)."""
    n_tokens: int
    """Prompt tokens, without BOS/EOS/padding."""


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


def fetch_tokenizer(data_dir: Path) -> Path:
    """Download the standard CLIP tokenizer files once (needs internet; never at import or in tests)."""
    target = data_dir / "tokenizers" / TOKENIZER_REPO.split("/")[-1]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise CheckpointError("the CLIP tokenizer is missing and huggingface_hub is not installed") from None
    target.mkdir(parents=True, exist_ok=True)
    try:
        for name in TOKENIZER_FILES:
            hf_hub_download(TOKENIZER_REPO, name, local_dir=target)
    except Exception as exc:
        raise CheckpointError(
            f"the CLIP tokenizer is not on this machine and could not be downloaded ({type(exc).__name__}); "
            f"put vocab.json and merges.txt from {TOKENIZER_REPO} in {target} or set SDTERM_TOKENIZER"
        ) from None
    return target


class PromptTokenizer:
    def __init__(self, folder: Path, max_positions: int = 77):
        from transformers import CLIPTokenizer

        try:
            self.tok = CLIPTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            raise CheckpointError(f"{folder}: not a usable CLIP tokenizer ({type(exc).__name__})") from None
        self.folder = folder
        self.max_positions = max_positions
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            h.update((folder / name).read_bytes())
        self.identity = f"clip-bpe:{h.hexdigest()}"
        """Changes whenever the vocabulary or merges do (part of the embedding cache key)."""
        self.bos = self.tok.bos_token_id
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos

    @property
    def chunk_tokens(self) -> int:
        return self.max_positions - 2

    def __call__(self, text: str) -> Tokens:
        ids = self.tok(text, add_special_tokens=False, truncation=False)["input_ids"]
        per = self.chunk_tokens
        n_chunks = max(1, -(-len(ids) // per))
        if n_chunks > MAX_CHUNKS:
            raise PromptError(
                f"prompt is {len(ids)} tokens; at most {MAX_CHUNKS * per} ({MAX_CHUNKS} chunks of {per}) are supported"
            )
        chunks = []
        for i in range(n_chunks):
            body = ids[i * per : (i + 1) * per]
            window = [self.bos, *body, self.eos]
            window += [self.pad] * (self.max_positions - len(window))
            chunks.append(tuple(window))
        return Tokens(tuple(chunks), len(ids))
