"""The tokenizer download path, against a local fake of the hub (tests never touch the network)."""

from __future__ import annotations

import shutil

import pytest

from sdterm.engine.loading.checkpoint import CheckpointError
from sdterm.engine.prompt import tokenizer
from sdterm.engine.prompt.tokenizer import TOKENIZER_REPO, fetch_tokenizer, find_tokenizer


def test_fetch_once_into_data_dir_then_found_offline(demo_model, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(tokenizer, "offline_reason", lambda: None)  # the hub answers

    calls = []

    def fake_download(repo_id, filename, local_dir):
        calls.append((repo_id, filename))
        shutil.copy(demo_model / "tokenizer" / filename, local_dir)
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    data = tmp_path / "data"
    folder = fetch_tokenizer(data)
    assert calls == [(TOKENIZER_REPO, "vocab.json"), (TOKENIZER_REPO, "merges.txt")]
    assert find_tokenizer(None, data) == folder


def test_fetch_failure_is_one_clear_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(tokenizer, "offline_reason", lambda: None)  # reachable, then the transfer fails
    with pytest.raises(CheckpointError, match="vocab.json and merges.txt") as info:
        fetch_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


@pytest.fixture
def network(monkeypatch):
    """The network layer, recorded: DNS fails (no network), hub downloads and sleeps are counted."""
    import socket
    import time

    import huggingface_hub

    calls = {"dns": 0, "connect": 0, "download": 0, "sleep": []}

    def no_dns(*a, **k):
        calls["dns"] += 1
        raise socket.gaierror(-2, "Name or service not known")

    def no_connect(*a, **k):
        calls["connect"] += 1
        raise OSError(101, "Network is unreachable")

    def download(*a, **k):
        calls["download"] += 1
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(time, "sleep", lambda s: calls["sleep"].append(s))
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _says_what_and_where(message: str, target) -> None:
    assert "\n" not in message
    for needed in ("vocab.json", "merges.txt", TOKENIZER_REPO, str(target), "SDTERM_TOKENIZER"):
        assert needed in message, needed


def test_offline_fails_at_once_naming_the_files_and_where_they_go(tmp_path, network):
    """No network: one DNS look-up, no download attempt, no retries, no sleeps."""
    with pytest.raises(CheckpointError, match="cannot resolve huggingface.co") as info:
        fetch_tokenizer(tmp_path)
    assert network == {"dns": 1, "connect": 0, "download": 0, "sleep": []}
    _says_what_and_where(str(info.value), tmp_path / "tokenizers" / "clip-vit-large-patch14")


def test_dns_but_no_route_is_one_connection_attempt(tmp_path, network, monkeypatch):
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    with pytest.raises(CheckpointError, match="cannot connect to huggingface.co:443"):
        fetch_tokenizer(tmp_path)
    assert network["connect"] == 1 and network["download"] == 0 and network["sleep"] == []


def test_hf_hub_offline_never_touches_the_network(tmp_path, network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set") as info:
        fetch_tokenizer(tmp_path)
    assert network == {"dns": 0, "connect": 0, "download": 0, "sleep": []}
    _says_what_and_where(str(info.value), tmp_path / "tokenizers" / "clip-vit-large-patch14")


def test_behind_a_proxy_the_proxy_is_tried(tmp_path, network, monkeypatch):
    """Where DNS is the proxy's job, the proxy is what must answer (not huggingface.co's name)."""
    import socket

    looked_up = []
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **k: looked_up.append((host, port)) or [])
    with pytest.raises(CheckpointError, match="cannot connect to proxy.example:3128"):
        fetch_tokenizer(tmp_path)
    assert looked_up == [("proxy.example", 3128)]


def test_generate_offline_without_a_tokenizer_is_one_line(demo_model, tmp_path, network, run_cli):
    """End to end: a model folder without its tokenizer, offline: one line, exit 1, at once."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_model, model)
    shutil.rmtree(model / "tokenizer")
    code, out, err = run_cli("generate", "x", "--model", model, "--outdir", tmp_path, "-s", 1, "-W", 64, "-H", 64)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "vocab.json" in err and "merges.txt" in err
    assert network["download"] == 0 and network["sleep"] == []
