"""What went wrong with a download, in one line that says what to do: a gated repo, a missing or
refused token, offline mode, an unreachable hub, a full disk, a transfer cut short (and how much of
it is kept for the next run)."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..units import format_bytes

LOGIN_HINT = "run `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"


def origin(url: str) -> tuple[str, str, int | None]:
    p = urlparse(url)
    return (p.scheme, (p.hostname or "").lower(), p.port)


def size_text(n: int | None) -> str:
    """A size in a message; '?' when it isn't known."""
    return "?" if n is None else format_bytes(n)


@dataclass
class Where:
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
        return f"; {size_text(have)} of {size_text(self.size)} kept in {self.part}: run `{self.command}` again to resume"


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
        host = origin(str(response.request.url))[1]  # type: ignore[union-attr]
    except Exception:
        host = ""
    return code, host


def explain(exc: BaseException, w: Where) -> str | None:
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
    hub_host = origin(w.endpoint)[1]
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
