"""The tokenizer download path, against a local fake of the hub (tests never touch the network)."""

from __future__ import annotations

import shutil

import pytest

from sdterm.engine.loading.checkpoint import CheckpointError
from sdterm.engine.prompt.tokenizer import TOKENIZER_REPO, fetch_tokenizer, find_tokenizer


def test_fetch_once_into_data_dir_then_found_offline(demo_model, tmp_path, monkeypatch):
    import huggingface_hub

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
    with pytest.raises(CheckpointError, match="vocab.json and merges.txt") as info:
        fetch_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
