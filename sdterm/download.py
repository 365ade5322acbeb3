"""``sdterm download``: an SD v1 checkpoint and the CLIP tokenizer from the Hugging Face hub.

How a file comes down (``_fetch``), built on huggingface_hub's own pieces (``hf_hub_url``,
``get_hf_file_metadata``, ``http_get``, its errors, token handling and progress bars):

1. HEAD ``/{repo}/resolve/main/{file}`` for the size, the CDN location and the hub's hash of the
   file (the ``X-Linked-Etag`` of an LFS/Xet file is its sha256; the ``ETag`` of a small git file
   is its git blob sha1).
2. GET (from the CDN link, or for a Xet-backed file through the resolve URL's redirect: plain HTTPS
   either way, hf_xet is not used) into ``{file}.{hash[:12]}.partial`` beside the final name,
   appending to what an earlier, interrupted run left there (an HTTP Range request;
   huggingface_hub's ``http_get`` also retries a dropped connection within the run).
3. Hash the finished partial file; on a mismatch delete it and say so; otherwise rename it to the
   final name. The final name only ever holds a verified file.

Why not ``hf_hub_download``: in huggingface_hub 2.x it downloads to a process-unique temporary file
and deletes it when the transfer fails, so an interrupted 4 GB download starts again from zero
(it resumes only within one call). Keeping the partial file ourselves makes Ctrl-C, a lost
connection or an expired CDN link cost nothing but the rest of the file.

Checksums: each checkpoint's sha256 is pinned in ``MODELS`` (the publishers' files, whose hashes
are widely published); the hub's own sha256 for the file (``X-Linked-Etag``, the same value as the
``lfs.sha256`` of ``HfApi.get_paths_info(..., expand=True)``) must agree before anything is
downloaded. A model without a pinned hash is checked against the hub's. Tokenizer files are small
git files: they are checked against the git blob sha1 the hub gives as their ETag.
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import EXIT_CANCELLED, UserError
from .units import format_bytes

REVISION = "main"
LOGIN_HINT = "run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


class DownloadError(UserError):
    """A download that could not be done or verified; one line for the user."""


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


def tokenizer_dir(data_dir: Path) -> Path:
    """Where ``find_tokenizer(None, data_dir)`` looks (``engine.text.tokenizer_dir_candidates``)."""
    from .engine.prompt.tokenizer import TOKENIZER_REPO

    return Path(data_dir) / "tokenizers" / TOKENIZER_REPO.split("/")[-1]


def partial_files(dest_dir: Path, filename: str) -> list[Path]:
    """What interrupted downloads of ``filename`` left in ``dest_dir``."""
    return sorted(Path(dest_dir).glob(f"{glob.escape(filename)}.*.partial"))


# --------------------------------------------------------------------------------------------
# The downloads


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
                digest = _file_hash(dest, "sha256", progress)
            except OSError as exc:
                raise DownloadError(f"cannot read {dest} ({exc.strerror or exc})") from None
            if digest != spec.sha256:
                raise DownloadError(
                    f"{dest} is not {spec.repo}/{spec.filename}: its sha256 is {digest[:16]}…, expected "
                    f"{spec.sha256[:16]}…; remove it or run `sdterm download {name} --force`"
                )
        return dest
    _fetch(spec.repo, spec.filename, dest, sha256=spec.sha256, token=token, endpoint=endpoint,
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
    from .engine.prompt.tokenizer import TOKENIZER_FILES, TOKENIZER_REPO

    target = tokenizer_dir(Path(data_dir).expanduser())
    for filename in TOKENIZER_FILES:
        if (target / filename).is_file() and not force:
            continue
        _fetch(TOKENIZER_REPO, filename, target / filename, sha256=None, token=token, endpoint=endpoint,
               progress=progress, force=force, command="sdterm download")
    return target


def _endpoint(endpoint: str | None) -> str:
    """The hub to use: the argument, else HF_ENDPOINT (read now, not at import), else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def _fetch(
    repo: str,
    filename: str,
    dest: Path,
    *,
    sha256: str | None,
    token: str | bool | None,
    endpoint: str | None,
    progress: bool,
    force: bool,
    command: str,
) -> None:
    """Download ``repo``/``filename`` to ``dest``, resumable and verified (see the module docstring)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    endpoint = _endpoint(endpoint)
    url = hf_hub_url(repo, filename, revision=REVISION, endpoint=endpoint)
    where = _Where(repo, filename, dest, url, endpoint, command)
    where.token_sent = _sends_token(token)
    try:
        meta = get_hf_file_metadata(url, token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        size = meta.size
        hub = _hub_hash(meta.etag)
        if sha256 and hub and hub[0] == "sha256" and hub[1] != sha256:
            raise DownloadError(
                f"the hub's {filename} in {repo} has sha256 {hub[1][:16]}…, not the {sha256[:16]}… sdterm knows; "
                "not downloading it (the publisher may have replaced the file)"
            )
        want = ("sha256", sha256) if sha256 else hub
        tag = (want[1] if want else re.sub(r"[^0-9A-Za-z]", "", meta.etag or ""))[:12] or "nohash"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(dest):
            part = dest.with_name(f"{dest.name}.{tag}.partial")
            for old in partial_files(dest.parent, dest.name):
                if old != part or force:  # another version's leftovers, or a fresh start
                    old.unlink(missing_ok=True)
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:
                part.unlink()
                have = 0
            where.part, where.size = part, size
            if size is not None:
                free = shutil.disk_usage(dest.parent).free
                if size - have > free:
                    raise DownloadError(
                        f"not enough disk space in {dest.parent}: {filename} needs {_mib(size - have)} more and "
                        f"{_mib(free)} are free; free some space or pass --dir DIR on another disk"
                    )
            # Like huggingface_hub's own plain-HTTP path: an LFS file comes from the CDN link the HEAD
            # pointed to; a Xet-backed one from the resolve URL, whose redirect the client follows.
            source = url if getattr(meta, "xet_file_data", None) is not None else meta.location
            _transfer(source, url, part, have, size, filename, token, progress)
            got = part.stat().st_size
            if size is not None and got > size:
                part.unlink()
                raise DownloadError(
                    f"{filename}: the download server sent {got} bytes, not {size}; run `{command}` again"
                )
            if size is not None and got < size:
                raise DownloadError(f"the transfer of {filename} ended early{where.kept()}")
            if want:
                digest = _file_hash(part, want[0], progress, dest.name)
                if digest != want[1]:
                    part.unlink()
                    raise DownloadError(
                        f"{filename}: {want[0]} mismatch (got {digest[:16]}…, expected {want[1][:16]}…): "
                        f"the download was corrupted and has been deleted; run `{command}` again"
                    )
            os.replace(part, dest)
            _fsync_dir(dest.parent)
    except DownloadError:
        raise
    except Exception as exc:
        message = _explain(exc, where)
        if message is None:
            raise
        raise DownloadError(message) from None


def _transfer(source: str, url: str, part: Path, have: int, size: int | None, filename: str,
              token: str | bool | None, progress: bool) -> None:
    """Append the rest of the file at ``source`` to ``part`` (huggingface_hub's http_get: Range, retries, bar).

    The token goes only to the hub (``url``'s origin); the client drops it on a redirect elsewhere.
    """
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, never of a compressed stream
    if _origin(source) != _origin(url):  # a signed CDN link: the token stays with the hub
        for key in [k for k in headers if k.lower() == "authorization"]:
            del headers[key]
    with _hub_progress(progress), open(part, "ab") as f:
        http_get(source, f, resume_size=have, headers=headers, expected_size=size, displayed_filename=filename)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# Helpers


def _hub_hash(etag: str | None) -> tuple[str, str] | None:
    """The hub's hash of a file from its (normalised) etag: LFS/Xet files -> sha256, git files -> git blob sha1."""
    if not etag:
        return None
    etag = etag.strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return ("sha256", etag)
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return ("git-sha1", etag)
    return None


def _file_hash(path: Path, algo: str, progress: bool, label: str | None = None) -> str:
    """sha256, or git's blob sha1 (``sha1(b"blob <size>\\0" + data)``), of ``path``."""
    size = path.stat().st_size
    if algo == "sha256":
        h = hashlib.sha256()
    else:
        h = hashlib.sha1()
        h.update(f"blob {size}\0".encode())
    bar = None
    if progress and size > 64 << 20:
        from huggingface_hub.utils import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{algo} {label or path.name}")
    try:
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    return h.hexdigest()


class _hub_progress:
    """huggingface_hub's progress bars on (as the user configured them) or off for one block."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.switched = False

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        if not self.enabled and not are_progress_bars_disabled():
            disable_progress_bars()
            self.switched = True
        return self

    def __exit__(self, *exc):
        if self.switched:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()


class _exclusive:
    """One writer per file: a second ``sdterm download`` of the same file stops at once."""

    def __init__(self, dest: Path):
        self.path = dest.with_name(f".{dest.name}.lock")
        self.lock = None

    def __enter__(self):
        from filelock import FileLock, Timeout  # a dependency of huggingface_hub

        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise DownloadError(
                f"another sdterm download is writing {self.path.name[1:-5]} in {self.path.parent}; "
                "wait for it to finish"
            ) from None
        except (OSError, NotImplementedError):  # a filesystem without locks: go on unlocked
            return self
        self.lock = lock
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlparse(url)
    return (p.scheme, (p.hostname or "").lower(), p.port)


def _sends_token(token: str | bool | None) -> bool:
    if token is False:
        return False
    if isinstance(token, str):
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:
        return False


def _mib(n: int | None) -> str:
    """A size in a message; '?' when it isn't known."""
    return "?" if n is None else format_bytes(n)


# --------------------------------------------------------------------------------------------
# What went wrong, in one line


@dataclass
class _Where:
    repo: str
    filename: str
    dest: Path
    url: str
    endpoint: str
    command: str
    part: Path | None = None
    size: int | None = None
    token_sent: bool = False

    @property
    def page(self) -> str:
        return f"{self.endpoint}/{self.repo}"

    def kept(self) -> str:
        """'; 1.2 GiB of 4.0 GiB kept in X: run `...` again to resume', or '' when nothing is kept."""
        try:
            have = self.part.stat().st_size if self.part is not None else 0
        except OSError:
            have = 0
        if not have:
            return ""
        return f"; {_mib(have)} of {_mib(self.size)} kept in {self.part}: run `{self.command}` again to resume"


_CONNECTION_ERRORS = {
    # httpx / httpx2 (huggingface_hub >= 1.0), then requests / urllib3 (older huggingface_hub)
    "TransportError", "NetworkError", "TimeoutException", "ProtocolError",
    "ConnectionError", "Timeout", "ChunkedEncodingError",
}


def _first_line(exc: BaseException, limit: int = 100) -> str:
    text = str(exc).strip().splitlines()
    line = next((t.strip() for t in text if t.strip()), "")
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _status(exc: BaseException) -> tuple[int | None, str]:
    """HTTP status and host of a hub HTTP error."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    try:
        host = _origin(str(response.request.url))[1]  # type: ignore[union-attr]
    except Exception:
        host = ""
    return code, host


def _explain(exc: BaseException, w: _Where) -> str | None:
    """One line that says what happened and what to do; None for errors this module does not know."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    kept = w.kept()
    manual = f"download {w.url} on a machine that can, and copy it to {w.dest}"
    if isinstance(exc, OfflineModeIsEnabled):
        return (
            f"HF_HUB_OFFLINE is set, so sdterm may not contact the hub: unset it and run `{w.command}` again, "
            f"or {manual}"
        )
    if isinstance(exc, GatedRepoError):
        return f"{w.repo} is gated: accept the licence at {w.page}, then {LOGIN_HINT}"
    code, host = _status(exc)
    hub_host = _origin(w.endpoint)[1]
    if isinstance(exc, RepositoryNotFoundError) or (
        isinstance(exc, HfHubHTTPError) and code in (401, 403) and host in ("", hub_host)
    ):
        if w.token_sent:
            return (
                f"the hub refused the token for {w.repo} (HTTP {code}): check HF_TOKEN or log in again "
                f"(`hf auth login`); a gated repo also needs its licence accepted at {w.page}"
            )
        return (
            f"{w.repo} needs a Hugging Face token (HTTP {code}): create a read token at {TOKENS_PAGE}, "
            f"then {LOGIN_HINT}"
        )
    if isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError):
        return f"{w.repo} has no {w.filename} on the hub any more; look for it at {w.page} and put it in {w.dest}"
    if isinstance(exc, HfHubHTTPError):
        advice = "try again later" if code is None or code >= 500 or code == 429 else "the link may have expired"
        again = kept or f"; run `{w.command}` again"
        return f"the download server answered HTTP {code} for {w.filename} ({advice}){again}"
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, LocalEntryNotFoundError) or names & _CONNECTION_ERRORS:
        if kept:
            return f"the connection to the hub broke off ({_first_line(exc)}){kept}"
        return f"this machine can't reach the hub at {w.endpoint} ({_first_line(exc)}): check the network, or {manual}"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return f"the disk holding {w.dest.parent} is full: free some space or pass --dir DIR on another disk{kept}"
        if exc.errno is None and "Consistency check failed" in str(exc):
            return f"the transfer of {w.filename} ended early{kept or f'; run `{w.command}` again'}"
        where = exc.filename or w.dest.parent
        return f"cannot write to {where} ({exc.strerror or _first_line(exc)})"
    return None


# --------------------------------------------------------------------------------------------
# Command line


def add_parser(sub) -> None:
    p = sub.add_parser(
        "download",
        help="fetch an SD v1 checkpoint and the CLIP tokenizer from the Hugging Face hub",
        description="Download a Stable Diffusion v1 checkpoint (verified by sha256, resumable) into the models "
        "folder, and the CLIP tokenizer beside it. HF_TOKEN / `hf auth login` and HF_ENDPOINT are honoured.",
    )
    listing = "; ".join(f"{s.name}: {s.repo}/{s.filename}" for s in MODELS.values())
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=tuple(MODELS), metavar="MODEL",
                   help=f"which checkpoint (default {DEFAULT_MODEL}); {listing}")
    p.add_argument("--dir", metavar="DIR", help="where the checkpoint goes (default: the data folder's models/)")
    p.add_argument("--force", action="store_true", help="download again even when the files are there")


def cmd_download(args: argparse.Namespace) -> int:
    from . import paths

    spec = MODELS[args.model]
    data = paths.data_dir()
    default_dir = data / "models"
    dest_dir = Path(args.dir).expanduser() if args.dir else default_dir
    dest = dest_dir / spec.filename
    had = dest.is_file() and not args.force
    print(f"{spec.name}: {spec.repo} {spec.filename}; licence {spec.licence}", file=sys.stderr)
    if spec.note:
        print(f"note: {spec.note}", file=sys.stderr)
    try:
        path = download_model(spec.name, dest_dir, force=args.force)
        print(f"{'already there, ' if had else ''}sha256 ok: {path}", file=sys.stderr)
        if spec.sha256:
            from .engine.loading.checkpoint import remember_sha256

            remember_sha256(path, spec.sha256, paths.cache_dir() / "model-hashes.json")
        tok = download_tokenizer(data, force=args.force)
    except KeyboardInterrupt:
        kept = partial_files(dest_dir, spec.filename)
        tail = (f"; {_mib(kept[0].stat().st_size)} kept in {kept[0]}: run the same command again to resume"
                if kept else "")
        print(f"sdterm: interrupted{tail}", file=sys.stderr)
        return EXIT_CANCELLED
    print(f"tokenizer: {tok}", file=sys.stderr)
    if dest_dir.resolve() != default_dir.resolve():
        print(f"outside the models folder: use it with --model {path}", file=sys.stderr)
    print(path)
    return 0
