"""What each command imports: argument errors, help and the cache commands never import torch or
transformers; a render from a checkpoint never imports transformers (the tokenizer is HF tokenizers', the
text encoder our own).

Checked on ``sys.modules`` in a fresh interpreter (no timings: machines are noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdterm.config import TextConfig

HEAVY = ("torch", "transformers")

PROBE = """
import contextlib, io, json, sys
from sdterm.cli import main
out, err = io.StringIO(), io.StringIO()
try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "err": err.getvalue(),
                  "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def imports_of(*args) -> dict:
    """Run ``sdterm ARGS`` in a fresh interpreter: its exit code, stderr and which of torch and
    transformers it imported."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ["--help"],
    ["generate", "--help"],
    ["generate", "--steps", "x"],
    ["generate", "a cat", "--bogus-flag"],
    ["generate"],  # no prompt
    ["generate", "a cat", "--steps", "0"],  # a bad value, found by the validator
    ["cache"],
    ["cache", "stats"],
    ["cache", "stats", "--json"],
    ["cache", "path"],
])
def test_quick_answers_import_neither_torch_nor_transformers(args):
    got = imports_of(*args)
    assert got["loaded"] == [], f"sdterm {' '.join(args)} imported {got['loaded']}"
    assert got["code"] in (0, 1, 2)


def test_a_render_from_a_checkpoint_never_imports_transformers(demo_model, tmp_path):
    """Neither on a prompt cache miss (the tokenizer is HF tokenizers', the encoder our own) nor
    on a hit."""
    args = ["generate", "a red fox", "--model", demo_model, "--seed", 1, "--steps", 2, "--width", 64,
            "--height", 64, "--outdir", tmp_path]
    first = imports_of(*args)
    assert first["code"] == 0, first["err"]
    assert "cache miss" in first["err"] and first["loaded"] == ["torch"]
    second = imports_of(*args)
    assert second["code"] == 0, second["err"]
    assert "cache hit" in second["err"]
    assert second["loaded"] == ["torch"]
    # A new text is a miss again: the tokenizer and the encoder run, and the render still works.
    third = imports_of(*args[:1], "a blue fox", *args[2:])
    assert third["code"] == 0 and "cache partial" in third["err"] and third["loaded"] == ["torch"]


def test_generate_begins_hashing_the_checkpoint_before_it_imports_torch(demo_model, tmp_path):
    """The file's sha256 (the model hash) runs beside torch's import; the models take that hash
    (remembered in the memo, so the next start hashes nothing)."""
    import hashlib

    from sdterm import paths
    from sdterm.engine.loading.file_hash import recall_sha256

    spy = PROBE.replace("from sdterm.cli import main", """from sdterm.engine.loading import hasher
seen = []
real_begin = hasher.begin
def begin(path, memo):
    seen.append({"path": str(path), "torch": "torch" in sys.modules, "memo": str(memo)})
    return real_begin(path, memo)
hasher.begin = begin
from sdterm.cli import main""").replace('"loaded":', '"seen": seen, "loaded":')
    ckpt = demo_model / "model.safetensors"
    args = ["generate", "a red fox", "--model", ckpt, "--config", demo_model / "config.yaml", "--seed", 1, "--steps", 1,
            "--width", 64, "--height", 64, "--outdir", tmp_path]
    proc = subprocess.run([sys.executable, "-c", spy, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["code"] == 0, got["err"]
    assert got["seen"] == [{"path": str(ckpt), "torch": False, "memo": str(paths.hash_memo_file())}]
    assert recall_sha256(ckpt, paths.hash_memo_file()) == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_memoized_tokens_are_the_tokenizers_own(demo_model, tmp_path):
    """The token memo gives exactly what the tokenizer gives (a fresh tokenizer reads the memo)."""
    from sdterm.engine.prompt.tokenizer import PromptTokenizer

    texts = ["a red fox", "", "a (castle:1.2) [snow]", "word " * 90]
    live = PromptTokenizer(demo_model / "tokenizer", memo=tmp_path)
    want = [live.ids(t) for t in texts]
    memo = PromptTokenizer(demo_model / "tokenizer", memo=tmp_path)
    assert [memo.ids(t) for t in texts] == want
    assert memo._tok is None  # never loaded: every text came from the memo
    assert len(want[-1]) > 75


def test_text_encoder_shape_table_matches_transformers():
    """The hand-written table (checkpoint checks and sizes without transformers) is CLIPTextModel's."""
    import torch

    from sdterm.engine.networks.clip import clip_inner, reference_text_model, text_encoder_shapes

    for cfg in (TextConfig(), TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2,
                                         num_heads=2, max_positions=77)):
        with torch.device("meta"):
            model = reference_text_model(cfg)
        real = {k: tuple(v.shape) for k, v in clip_inner(model).state_dict().items() if not k.endswith("position_ids")}
        assert text_encoder_shapes(cfg) == real


def test_the_app_draws_before_torch_is_imported(demo_model):
    """The app's screen comes up before the model loads: everything up to ``app.run()`` — the
    command line, settings, history, the UI modules — imports neither torch nor transformers (the
    model's loader imports them on its worker thread, with the screen already drawn)."""
    probe = """
import json, sys
import sdterm.cli.app as cli_app
import sdterm.ui.app as ui_app
from sdterm.cli import main

seen = {}
class Stop(Exception):
    pass
def run(self):
    seen["loaded"] = [m for m in ("torch", "transformers") if m in sys.modules]
    raise Stop
ui_app.SdtermApp.run = run
cli_app.require_terminal = lambda: None
import sdterm.ui.terminal as terminal
terminal.prepare_graphics = lambda protocol="auto": protocol
try:
    main(["--model", sys.argv[1], "--device", "cpu"])
except Stop:
    pass
print(json.dumps(seen))
"""
    proc = subprocess.run([sys.executable, "-c", probe, str(demo_model)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"loaded": []}
