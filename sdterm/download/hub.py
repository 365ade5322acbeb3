"""One file from the Hugging Face hub, resumable and verified.

How a file comes down (``fetch``), built on huggingface_hub's own pieces (``hf_hub_url``,
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
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
from pathlib import Path

from ..errors import UserError
from .explain import Where, explain, origin, size_text

REVISION = "main"


class DownloadError(UserError):
    """A download that could not be done or verified; one line for the user."""


def partial_files(dest_dir: Path, filename: str) -> list[Path]:
    """What interrupted downloads of ``filename`` left in ``dest_dir``."""
    return sorted(Path(dest_dir).glob(f"{glob.escape(filename)}.*.partial"))


def _endpoint(endpoint: str | None) -> str:
    """The hub to use: the argument, else HF_ENDPOINT (read now, not at import), else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT


def fetch(
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
    where = Where(repo, filename, dest, url, endpoint, command)
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
                        f"not enough disk space in {dest.parent}: {filename} needs {size_text(size - have)} more and "
                        f"{size_text(free)} are free; free some space or pass --dir DIR on another disk"
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
                digest = file_hash(part, want[0], progress, dest.name)
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
        message = explain(exc, where)
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
    if origin(source) != origin(url):  # a signed CDN link: the token stays with the hub
        for key in [k for k in headers if k.lower() == "authorization"]:
            del headers[key]
    with _hub_progress(progress), open(part, "ab") as f:
        http_get(source, f, resume_size=have, headers=headers, expected_size=size, displayed_filename=filename)
        f.flush()
        os.fsync(f.fileno())


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


def file_hash(path: Path, algo: str, progress: bool, label: str | None = None) -> str:
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
