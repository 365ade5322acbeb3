"""The checkpoints ``sdterm download`` knows, and the two downloads: a checkpoint into the models
folder, the CLIP tokenizer into the data folder.

Checksums: each checkpoint's sha256 is pinned in ``MODELS`` (the publishers' files, whose hashes
are widely published); the hub's own sha256 for the file (``X-Linked-Etag``, the same value as the
``lfs.sha256`` of ``HfApi.get_paths_info(..., expand=True)``) must agree before anything is
downloaded. A model without a pinned hash is checked against the hub's. Tokenizer files are small
git files: they are checked against the git blob sha1 the hub gives as their ETag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .hub import DownloadError, fetch, file_hash


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str
    filename: str
    sha256: str | None
    """The file's sha256; None means: trust the hub's LFS sha256 for it."""
    licence: str
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "sd-v1-5",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "v1-5-pruned-emaonly.safetensors",
            "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
            "CreativeML OpenRAIL-M",
            "the EMA-only weights as safetensors, 4.0 GiB",
        ),
        ModelSpec(
            "sd-v1-4",
            "CompVis/stable-diffusion-v-1-4-original",
            "sd-v1-4.ckpt",
            "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556",
            "CreativeML OpenRAIL-M (accept it on the hub first: the repo is gated)",
            "a .ckpt (pickle; read with torch's weights-only loader): the publisher offers no safetensors for v1.4",
        ),
    )
}
DEFAULT_MODEL = "sd-v1-5"


@dataclass(frozen=True)
class ExtraSpec:
    """A small file that is not a checkpoint, fetched into the data folder."""

    name: str
    repo: str
    filename: str
    dest: str
    """Where it goes, relative to the data folder."""
    licence: str
    note: str = ""


TAESD = ExtraSpec(
    "taesd", "madebyollin/taesd", "diffusion_pytorch_model.safetensors", "taesd/diffusion_pytorch_model.safetensors",
    "MIT", "TAESD, the tiny autoencoder (about 10 MB with its encoder): better live previews where the VRAM "
    "budget has room; its sha256 is the hub's",
)
EXTRAS = {TAESD.name: TAESD}


def download_extra(name: str, data_dir: Path | str, *, force: bool = False, progress: bool = True,
                   endpoint: str | None = None) -> Path:
    """Fetch the extra file ``name`` (a key of ``EXTRAS``) into the data folder; returns its path.
    A file already there is kept unless ``force``. Raises ``DownloadError``."""
    spec = EXTRAS[name]
    dest = Path(data_dir).expanduser() / spec.dest
    if dest.is_file() and not force:
        return dest
    fetch(spec.repo, spec.filename, dest, sha256=None, token=None, endpoint=endpoint, progress=progress, force=force,
          command=f"sdterm download {name}")
    return dest


def tokenizer_dir(data_dir: Path) -> Path:
    """Where ``find_tokenizer(None, data_dir)`` looks (``engine.text.tokenizer_dir_candidates``)."""
    from ..engine.prompt.tokenizer import TOKENIZER_REPO

    return Path(data_dir) / "tokenizers" / TOKENIZER_REPO.split("/")[-1]


def download_model(
    name: str,
    dest_dir: Path | str,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Fetch checkpoint ``name`` (a key of ``MODELS``) into ``dest_dir``; returns its path.

    A file already under the final name is checked against the pinned sha256 (offline) and kept;
    ``force`` downloads it again (the old file stays until the new one is verified). ``token``:
    None means huggingface_hub's usual token (HF_TOKEN, then the stored login). ``endpoint``:
    None means HF_ENDPOINT, else https://huggingface.co. Raises ``DownloadError``.
    """
    spec = MODELS.get(name)
    if spec is None:
        raise DownloadError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    dest = Path(dest_dir).expanduser() / spec.filename
    if dest.is_file() and not force:
        if spec.sha256:
            try:
                digest = file_hash(dest, "sha256", progress)
            except OSError as exc:
                raise DownloadError(f"cannot read {dest} ({exc.strerror or exc})") from None
            if digest != spec.sha256:
                raise DownloadError(
                    f"{dest} is not {spec.repo}/{spec.filename}: its sha256 is {digest[:16]}…, expected "
                    f"{spec.sha256[:16]}…; remove it or run `sdterm download {name} --force`"
                )
        return dest
    fetch(spec.repo, spec.filename, dest, sha256=spec.sha256, token=token, endpoint=endpoint,
           progress=progress, force=force, command=f"sdterm download {name}")
    return dest


def download_tokenizer(
    data_dir: Path | str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """vocab.json and merges.txt of the CLIP tokenizer into ``data_dir/tokenizers/clip-vit-large-patch14``.

    Files already there are kept (no network) unless ``force``. Raises ``DownloadError``.
    """
    from ..engine.prompt.tokenizer import TOKENIZER_FILES, TOKENIZER_REPO

    target = tokenizer_dir(Path(data_dir).expanduser())
    for filename in TOKENIZER_FILES:
        if (target / filename).is_file() and not force:
            continue
        fetch(TOKENIZER_REPO, filename, target / filename, sha256=None, token=token, endpoint=endpoint,
               progress=progress, force=force, command="sdterm download")
    return target
