"""``sdterm download`` against a local fake of the Hugging Face hub (loopback only, never the network).

The fake speaks what huggingface_hub uses to fetch one file: HEAD/GET ``/{repo}/resolve/{rev}/{file}``
with ``X-Repo-Commit`` and ``ETag``; for LFS files a 302 to a second server (the "CDN", another
origin, as on the real hub) with ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; byte ranges
(206 + ``Content-Range``) on the CDN; ``X-Error-Code`` on errors (``GatedRepo``, ``RepoNotFound``).
It can drop a transfer after N bytes, and answer 503 afterwards (to end a run mid-file).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sdterm.download import MODELS, DownloadError, command, download_model, download_tokenizer, partial_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SD15 = MODELS["sd-v1-5"]
CLIP_REPO = "openai/clip-vit-large-patch14"
TIMEOUT = 5  # seconds: every request the client makes is bounded by this


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeFile:
    data: bytes
    lfs: bool = True
    xet: bool = False  # announce a Xet-backed file (X-Xet-Hash): clients then GET the resolve URL
    served: bytes | None = None  # what the CDN actually sends (corruption), default: data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class FakeHub:
    def __init__(self):
        self.files: dict[tuple[str, str], FakeFile] = {}
        self.repo_errors: dict[str, tuple[int, dict[str, str]]] = {}
        self.drop_after: int | None = None  # the next blob GET stops after this many bytes
        self.then_status: int | None = None  # after a drop, blob GETs get this status (ends the run)
        self.requests: list[dict] = []
        self._lock = threading.Lock()

    def add(self, repo: str, filename: str, data: bytes, **kw) -> FakeFile:
        f = FakeFile(data, **kw)
        self.files[(repo, filename)] = f
        return f

    def seen(self, server: str, method: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if r["server"] == server and method in (None, r["method"])]

    def start(self) -> None:
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "cdn"))
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self.threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                        for s in (self.hub, self.cdn)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        for s in (self.hub, self.cdn):
            s.shutdown()
            s.server_close()
        for t in self.threads:
            t.join(TIMEOUT)


def _handler(fake: FakeHub, role: str):
    class Handler(BaseHTTPRequestHandler):
        timeout = TIMEOUT

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _record(self):
            with fake._lock:
                fake.requests.append({
                    "server": role, "method": self.command, "path": self.path,
                    "range": self.headers.get("Range"), "auth": self.headers.get("Authorization"),
                })

        def _reply(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

        def _serve(self, body: bool):
            self._record()
            if role == "hub":
                self._resolve(body)
            else:
                self._blob(body)

        def _resolve(self, body: bool):
            m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.path)
            if m is None:
                return self._reply(404, {}, b"not a resolve url", body)
            repo, filename = m["repo"], m["file"]
            if repo in fake.repo_errors:
                status, headers = fake.repo_errors[repo]
                payload = json.dumps({"error": headers.get("X-Error-Message", "")}).encode()
                return self._reply(status, headers, payload, body)
            f = fake.files.get((repo, filename))
            if f is None:
                return self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", body)
            if f.lfs:  # the pointer's own etag, the file's sha256 and size in X-Linked-*, and a 302 to the CDN
                xet = {"X-Xet-Hash": f.sha256[::-1],
                       "X-Xet-Refresh-Route": f"/api/models/{repo}/xet-read-token/{COMMIT}"}
                return self._reply(302, {
                    **(xet if f.xet else {}),
                    "X-Repo-Commit": COMMIT,
                    "ETag": f'"{git_sha1(b"pointer " + f.data[:16])}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(len(f.data)),
                    "Location": f"{fake.cdn_url}/blobs/{f.sha256}?Expires=9999999999&Signature=fake",
                }, b"", body)
            served = f.served if f.served is not None else f.data
            return self._reply(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(f.data)}"'}, served, body)

        def _blob(self, body: bool):
            m = re.fullmatch(r"/blobs/(?P<sha>[0-9a-f]{64})(\?.*)?", self.path)
            f = next((f for f in fake.files.values() if m and f.sha256 == m["sha"]), None)
            if f is None:
                return self._reply(404, {}, b"no such blob", body)
            data = f.served if f.served is not None else f.data
            if body and fake.then_status is not None and fake.drop_after is None:
                return self._reply(fake.then_status, {}, b"service unavailable", body)
            start = 0
            rng = self.headers.get("Range")
            if rng:
                start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                if start >= len(data):
                    return self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", "Accept-Ranges": "bytes"}
                status = 206
            else:
                headers, status = {"Accept-Ranges": "bytes"}, 200
            chunk = data[start:]
            if body and fake.drop_after is not None:  # promise the whole range, send part of it, hang up
                cut = fake.drop_after
                fake.drop_after = None
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                self.wfile.write(chunk[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._reply(status, headers, chunk, body)

    return Handler


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """huggingface_hub online (conftest turns it off), isolated from the user's HF home, no proxies, short timeouts."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import: patch the constant too
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", TIMEOUT)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", TIMEOUT)
    # Small chunks, so a transfer dropped after a few KB has written some of them (the default is 10 MB).
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    getattr(_http, "close_session", lambda: None)()  # a client made earlier may carry other settings
    yield
    getattr(_http, "close_session", lambda: None)()


@pytest.fixture
def hub(hub_env):
    fake = FakeHub()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_sd15(hub, monkeypatch):
    """sd-v1-5's repo and file name on the fake hub, with 300 KB of known bytes (and their sha256 pinned)."""
    data = hashlib.sha256(b"seed").digest() * (300 * 1024 // 32)
    f = hub.add(SD15.repo, SD15.filename, data)
    monkeypatch.setitem(MODELS, "sd-v1-5", dataclasses.replace(SD15, sha256=f.sha256))
    return f


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------
# Tests


def test_known_models_prefer_safetensors_and_pin_sha256():
    assert MODELS["sd-v1-5"].filename.endswith(".safetensors")
    assert MODELS["sd-v1-4"].filename == "sd-v1-4.ckpt" and "no safetensors" in MODELS["sd-v1-4"].note
    for spec in MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)


def test_full_download_lands_in_models_with_the_right_bytes(hub, fake_sd15, tmp_path):
    dest = tmp_path / "models"
    path = download_model("sd-v1-5", dest, endpoint=hub.url, progress=False)
    assert path == dest / SD15.filename
    assert path.read_bytes() == fake_sd15.data
    assert [p.name for p in dest.iterdir() if not p.name.startswith(".")] == [SD15.filename]  # no partial left
    assert len(hub.seen("cdn", "GET")) == 1 and hub.seen("cdn", "GET")[0]["range"] is None


def test_token_goes_to_the_hub_but_not_to_the_cdn(hub, fake_sd15, tmp_path):
    download_model("sd-v1-5", tmp_path, endpoint=hub.url, token="hf_test", progress=False)
    assert hub.seen("hub", "HEAD")[0]["auth"] == "Bearer hf_test"
    assert all(r["auth"] is None for r in hub.seen("cdn"))


def test_dropped_connection_is_resumed_within_the_run_with_a_range_request(hub, fake_sd15, tmp_path):
    hub.drop_after = 100_000
    path = download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    assert path.read_bytes() == fake_sd15.data
    gets = hub.seen("cdn", "GET")
    assert len(gets) == 2 and gets[0]["range"] is None
    start = int(re.fullmatch(r"bytes=(\d+)-", gets[1]["range"])[1])
    assert 0 < start <= 100_000


def test_interrupted_run_keeps_the_partial_file_and_the_next_run_resumes_it(hub, fake_sd15, tmp_path):
    hub.drop_after, hub.then_status = 100_000, 503  # the transfer breaks, and the retry within the run fails
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    msg = one_line(info)
    assert "503" in msg and "again to resume" in msg
    assert not (tmp_path / SD15.filename).exists()  # never a half file under the final name
    (part,) = partial_files(tmp_path, SD15.filename)
    kept = part.stat().st_size
    assert 0 < kept <= 100_000 and part.read_bytes() == fake_sd15.data[:kept]

    hub.then_status = None
    path = download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    assert path.read_bytes() == fake_sd15.data
    assert hub.seen("cdn", "GET")[-1]["range"] == f"bytes={kept}-"
    assert partial_files(tmp_path, SD15.filename) == []


def test_xet_backed_file_comes_through_the_resolve_redirect_with_range_and_without_token_at_the_cdn(
    hub, fake_sd15, tmp_path
):
    fake_sd15.xet = True
    hub.drop_after = 100_000
    path = download_model("sd-v1-5", tmp_path, endpoint=hub.url, token="hf_test", progress=False)
    assert path.read_bytes() == fake_sd15.data
    resolve_gets = hub.seen("hub", "GET")
    assert len(resolve_gets) == 2 and all(r["auth"] == "Bearer hf_test" for r in resolve_gets)
    assert resolve_gets[1]["range"] is not None
    cdn = hub.seen("cdn", "GET")
    assert [r["range"] is not None for r in cdn] == [False, True]
    assert all(r["auth"] is None for r in cdn)


def test_checksum_mismatch_is_one_line_and_leaves_no_file(hub, fake_sd15, tmp_path):
    corrupted = bytearray(fake_sd15.data)
    corrupted[1234] ^= 0xFF
    fake_sd15.served = bytes(corrupted)
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    msg = one_line(info)
    assert "sha256 mismatch" in msg and SD15.filename in msg
    assert not (tmp_path / SD15.filename).exists()
    assert partial_files(tmp_path, SD15.filename) == []


def test_hub_hash_differing_from_the_pinned_one_stops_before_downloading(hub, fake_sd15, tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "sd-v1-5", dataclasses.replace(SD15, sha256="f" * 64))
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    assert "not downloading" in one_line(info)
    assert hub.seen("cdn") == []


def test_without_a_pinned_hash_the_hubs_sha256_is_used(hub, fake_sd15, tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "sd-v1-5", dataclasses.replace(SD15, sha256=None))
    fake_sd15.served = fake_sd15.data[:-1] + b"\x00"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)


def test_gated_repo_says_accept_the_licence_then_log_in(hub, fake_sd15, tmp_path):
    refusal = "Access to model is restricted and you are not in the authorized list."
    hub.repo_errors[SD15.repo] = (403, {"X-Error-Code": "GatedRepo", "X-Error-Message": refusal})
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    msg = one_line(info)
    assert f"accept the licence at {hub.url}/{SD15.repo}" in msg
    assert "hf auth login" in msg and "HF_TOKEN" in msg
    assert not (tmp_path / SD15.filename).exists()


def test_401_without_a_token_asks_for_one(hub, fake_sd15, tmp_path):
    hub.repo_errors[SD15.repo] = (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    msg = one_line(info)
    assert "needs a Hugging Face token" in msg and "HF_TOKEN" in msg and "settings/tokens" in msg


def test_401_with_a_bad_token_says_it_was_refused(hub, fake_sd15, tmp_path):
    hub.repo_errors[SD15.repo] = (401, {"X-Error-Message": "Invalid credentials in Authorization header"})
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, token="hf_wrong", progress=False)
    assert "refused the token" in one_line(info)
    assert hub.seen("hub")[0]["auth"] == "Bearer hf_wrong"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_hub_reachable_says_so_and_how_to_copy_the_file(hub_env, tmp_path):
    endpoint = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=endpoint, progress=False)
    msg = one_line(info)
    assert f"can't reach the hub at {endpoint}" in msg
    assert f"{endpoint}/{SD15.repo}/resolve/main/{SD15.filename}" in msg and str(tmp_path / SD15.filename) in msg


def test_offline_mode_is_named(hub, fake_sd15, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    assert "HF_HUB_OFFLINE is set" in one_line(info)
    assert hub.requests == []


def test_not_enough_disk_space_is_said_before_downloading(hub, fake_sd15, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    assert "not enough disk space" in one_line(info) and "--dir" in str(info.value)
    assert hub.seen("cdn") == []


def test_disk_full_during_the_transfer(hub, fake_sd15, tmp_path, monkeypatch):
    import huggingface_hub.file_download as fd

    def full(url, temp_file, **kw):
        temp_file.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fd, "http_get", full)
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    msg = one_line(info)
    assert "is full" in msg and "again to resume" in msg
    assert not (tmp_path / SD15.filename).exists()


def test_existing_file_is_verified_offline_and_kept(hub_env, fake_sd15, tmp_path):
    (tmp_path / SD15.filename).write_bytes(fake_sd15.data)
    nowhere = f"http://127.0.0.1:{_free_port()}"
    assert download_model("sd-v1-5", tmp_path, endpoint=nowhere, progress=False) == tmp_path / SD15.filename
    (tmp_path / SD15.filename).write_bytes(b"something else")
    with pytest.raises(DownloadError) as info:
        download_model("sd-v1-5", tmp_path, endpoint=nowhere, progress=False)
    assert "--force" in one_line(info)


def test_force_replaces_the_file_only_after_verifying_the_new_one(hub, fake_sd15, tmp_path):
    old = tmp_path / SD15.filename
    old.write_bytes(b"old file")
    fake_sd15.served = b"\x00" * len(fake_sd15.data)
    with pytest.raises(DownloadError, match="mismatch"):
        download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False, force=True)
    assert old.read_bytes() == b"old file"
    fake_sd15.served = None
    download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False, force=True)
    assert old.read_bytes() == fake_sd15.data


def _serve_tokenizer(hub: FakeHub, tmp_path: Path) -> Path:
    from sdterm.engine.loading.demo import write_tokenizer

    src = tmp_path / "tokenizer-src"
    write_tokenizer(src)
    for name in ("vocab.json", "merges.txt"):
        hub.add(CLIP_REPO, name, (src / name).read_bytes(), lfs=False)
    return src


def test_tokenizer_lands_where_find_tokenizer_looks(hub, tmp_path):
    from sdterm.engine.prompt.tokenizer import find_tokenizer

    src = _serve_tokenizer(hub, tmp_path)
    data = tmp_path / "data"
    folder = download_tokenizer(data, endpoint=hub.url)
    assert find_tokenizer(None, data) == folder
    for name in ("vocab.json", "merges.txt"):
        assert (folder / name).read_bytes() == (src / name).read_bytes()
    # Present: no network the second time.
    n = len(hub.requests)
    assert download_tokenizer(data, endpoint=hub.url) == folder and len(hub.requests) == n


def test_tokenizer_file_is_checked_against_the_hubs_git_hash(hub, tmp_path):
    _serve_tokenizer(hub, tmp_path)
    merges = hub.files[(CLIP_REPO, "merges.txt")]
    merges.served = merges.data[:-2] + b"?\n"  # same length, other bytes, under the original ETag
    with pytest.raises(DownloadError) as info:
        download_tokenizer(tmp_path / "data", endpoint=hub.url)
    assert "git-sha1 mismatch" in one_line(info)
    assert not (tmp_path / "data" / "tokenizers" / "clip-vit-large-patch14" / "merges.txt").exists()


def test_cli_command_downloads_both_and_prints_the_path(hub, fake_sd15, tmp_path, monkeypatch, capsys):
    from sdterm import paths

    _serve_tokenizer(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # read at call time, not only at huggingface_hub's import
    parser = argparse.ArgumentParser(prog="sdterm")
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["download"])
    assert args.model == "sd-v1-5"
    assert command.run(args) == 0
    out, err = capsys.readouterr()
    expected = paths.data_dir() / "models" / SD15.filename
    assert out.strip() == str(expected) and expected.read_bytes() == fake_sd15.data
    assert "CreativeML OpenRAIL-M" in err and "tokenizer:" in err

    n = len(hub.requests)  # again: everything is there, nothing goes over the network
    assert command.run(parser.parse_args(["download", "sd-v1-5"])) == 0
    assert "already there" in capsys.readouterr().err and len(hub.requests) == n


def test_cli_dir_puts_the_checkpoint_elsewhere(hub, fake_sd15, tmp_path, monkeypatch, capsys):
    _serve_tokenizer(hub, tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    parser = argparse.ArgumentParser(prog="sdterm")
    command.add_parser(parser.add_subparsers(dest="command"))
    assert command.run(parser.parse_args(["download", "--dir", str(tmp_path / "elsewhere")])) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "elsewhere" / SD15.filename)
    assert "--model" in err


def test_cli_interrupt_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(name, dest_dir, **kw):
        Path(dest_dir).mkdir(parents=True)
        (Path(dest_dir) / f"{SD15.filename}.abc.partial").write_bytes(b"x" * 2048)
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "download_model", interrupted)
    parser = argparse.ArgumentParser(prog="sdterm")
    command.add_parser(parser.add_subparsers(dest="command"))
    assert command.run(parser.parse_args(["download", "--dir", str(tmp_path / "m")])) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "2 KiB kept" in err and "again to resume" in err


def test_a_second_download_of_the_same_file_stops_at_once(hub, fake_sd15, tmp_path):
    from filelock import FileLock

    with FileLock(str(tmp_path / f".{SD15.filename}.lock")):
        with pytest.raises(DownloadError) as info:
            download_model("sd-v1-5", tmp_path, endpoint=hub.url, progress=False)
    assert "another sdterm download" in one_line(info)
    assert hub.seen("cdn") == []


def test_cli_rejects_unknown_models():
    parser = argparse.ArgumentParser(prog="sdterm")
    command.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["download", "sd-v2"])


def test_the_fake_hub_serves_hf_hub_download_too_and_it_resumes_within_a_call(hub, tmp_path):
    """The fake is faithful enough for huggingface_hub's own downloader, whose retry uses a Range request."""
    from huggingface_hub import hf_hub_download

    data = bytes(range(256)) * 1200
    hub.add("someone/tiny", "weights.bin", data)
    hub.drop_after = 50_000
    path = hf_hub_download("someone/tiny", "weights.bin", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == data
    assert hub.seen("cdn", "GET")[-1]["range"] is not None
