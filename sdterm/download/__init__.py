"""``sdterm download``: an SD v1 checkpoint and the CLIP tokenizer from the Hugging Face hub,
resumable and verified.

* ``catalog.py``: the checkpoints sdterm knows (``MODELS``, each with its pinned sha256) and the
  two downloads, ``download_model`` and ``download_tokenizer``;
* ``hub.py``: how one file comes down (``fetch``): a resumable partial file beside the final name,
  its hash checked before it takes that name;
* ``explain.py``: what went wrong, in one line that says what to do;
* ``command.py``: ``sdterm download``'s flags (``add_parser``) and ``run``.

huggingface_hub is imported inside the functions that use it. The names below are the package's
public API.
"""

from .catalog import DEFAULT_MODEL, MODELS, ModelSpec, download_model, download_tokenizer, tokenizer_dir
from .hub import DownloadError, partial_files

__all__ = [
    "DEFAULT_MODEL", "MODELS", "DownloadError", "ModelSpec", "download_model", "download_tokenizer",
    "partial_files", "tokenizer_dir",
]
