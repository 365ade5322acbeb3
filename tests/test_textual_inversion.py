"""Textual-inversion embedding files: A1111's formats, the A1111 hash, hostile and unusable files,
a folder of them, and finding trigger words in token ids (issue 14)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdterm.engine.loading.checkpoint import CheckpointError, open_checkpoint
from sdterm.engine.prompt import embedding_db
from sdterm.engine.prompt import embeddings as E
from sdterm.engine.prompt.embedding_db import EmbeddingDB
from sdterm.engine.prompt.embeddings import EmbeddingError, load_embedding, ti_hashes

W = 768


def _vec(n: int, width: int = W, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g).to(dtype)


def write_a1111_pt(path: Path, vec: torch.Tensor, **extra) -> Path:
    """What A1111's Embedding.save writes (a trained vector keeps requires_grad)."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec.clone().requires_grad_(True)},
        "name": path.stem,
        "step": 1500,
        "sd_checkpoint": "e1441589a6",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    data.update(extra)
    torch.save(data, path)
    return path


def write_emb_params(path: Path, vec: torch.Tensor) -> Path:
    save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def write_diffusers_bin(path: Path, vec: torch.Tensor, token: str = "<cat-toy>") -> Path:
    torch.save({token: vec}, path)
    return path


def _one_line_about(exc: BaseException, path: Path, *words: str) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


def test_a1111_pt(tmp_path):
    vec = _vec(3, seed=1)
    path = write_a1111_pt(tmp_path / "easynegative.pt", vec)
    emb = load_embedding(path)
    assert emb.name == "easynegative"
    assert emb.path == path
    assert (emb.format, emb.container) == ("string_to_param", "pickle")
    assert emb.vectors.dtype == torch.float32 and emb.vectors.shape == (3, W)
    assert not emb.vectors.requires_grad
    assert torch.equal(emb.vectors, vec)
    assert (emb.n_vectors, emb.width) == (3, W)
    assert (emb.step, emb.trained_on) == (1500, "v1-5-pruned-emaonly")


def test_a1111_pt_half_precision_and_one_vector(tmp_path):
    vec = _vec(1, seed=2, dtype=torch.float16)
    emb = load_embedding(write_a1111_pt(tmp_path / "tiny.pt", vec))
    assert emb.vectors.dtype == torch.float32
    assert torch.equal(emb.vectors, vec.float())


def test_old_pt_with_a_parameter_dict(tmp_path):
    """Files from torch <= 1.11 (and the original textual-inversion code) pickled a ParameterDict."""
    vec = _vec(2, seed=3)
    path = tmp_path / "old-style.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    emb = load_embedding(path)
    assert emb.format == "string_to_param"
    assert torch.equal(emb.vectors, vec)
    # the extra allowance lasts only for the load: checkpoints still refuse the class
    assert torch.nn.ParameterDict not in torch.serialization.get_safe_globals()
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(path)


def test_safetensors_emb_params(tmp_path):
    vec = _vec(4, seed=4, dtype=torch.float16)
    emb = load_embedding(write_emb_params(tmp_path / "bad-hands-5.safetensors", vec))
    assert emb.name == "bad-hands-5"
    assert (emb.format, emb.container) == ("emb_params", "safetensors")
    assert emb.vectors.dtype == torch.float32 and torch.equal(emb.vectors, vec.float())
    assert emb.step is None and emb.trained_on is None


def test_diffusers_bin_one_vector(tmp_path):
    vec = torch.randn(W)
    emb = load_embedding(write_diffusers_bin(tmp_path / "cat-toy.bin", vec))
    assert emb.name == "cat-toy"  # the file's name, not the token inside
    assert (emb.format, emb.container) == ("diffusers", "pickle")
    assert emb.vectors.shape == (1, W)
    assert torch.equal(emb.vectors[0], vec)


def test_diffusers_safetensors(tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    vec = torch.randn(W)
    save_file({"<my-concept>": vec}, str(path))
    emb = load_embedding(path)
    assert (emb.format, emb.container) == ("diffusers", "safetensors")
    assert torch.equal(emb.vectors, vec[None])


def test_format_is_read_from_content_not_extension(tmp_path):
    vec = _vec(2, seed=5)
    path = write_emb_params(tmp_path / "renamed.pt", vec)
    emb = load_embedding(path)
    assert emb.container == "safetensors" and torch.equal(emb.vectors, vec)


def test_other_widths_are_accepted_when_asked_for(tmp_path):
    vec = _vec(2, width=1024, seed=6)
    emb = load_embedding(write_a1111_pt(tmp_path / "sd2.pt", vec), width=1024)
    assert emb.width == 1024


# --------------------------------------------------------------------------------------------
# The A1111 hash
# --------------------------------------------------------------------------------------------


def test_hash_is_a1111s_short_sha256_of_the_file(tmp_path):
    path = write_emb_params(tmp_path / "neg.safetensors", _vec(2, seed=7))
    emb = load_embedding(path)
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    assert emb.sha256 == full
    assert emb.hash == full[:12]
    assert re.fullmatch(r"[0-9a-f]{12}", emb.hash)


def test_known_hash_value(tmp_path):
    """A fixed file gives a fixed hash (the sha256 of its bytes, not of its tensors)."""
    path = tmp_path / "fixed.safetensors"
    save_file({"emb_params": torch.arange(2 * W, dtype=torch.float32).reshape(2, W)}, str(path))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert load_embedding(path).hash == expected
    # the same vectors in another container hash differently, as in A1111
    other = tmp_path / "fixed.pt"
    write_a1111_pt(other, torch.arange(2 * W, dtype=torch.float32).reshape(2, W))
    assert load_embedding(other).hash != expected


def test_ti_hashes_field(tmp_path):
    a = load_embedding(write_emb_params(tmp_path / "easynegative.safetensors", _vec(1, seed=8)))
    b = load_embedding(write_emb_params(tmp_path / "bad:hands, v2.safetensors", _vec(1, seed=9)))
    assert ti_hashes([a, b, a]) == f"easynegative: {a.hash}, badhands v2: {b.hash}"
    assert ti_hashes([]) == ""


# --------------------------------------------------------------------------------------------
# Hostile files: refused, and their code never runs
# --------------------------------------------------------------------------------------------


class _Gadget:
    """Unpickling this calls os.mkdir(marker): a visible side effect if it ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


class _SystemGadget:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_files(tmp_path: Path, marker: Path):
    yield "gadget as the vector (.pt zip)", "evil.pt", lambda p: torch.save(
        {"string_to_param": {"*": _Gadget(marker)}, "name": "evil"}, p)
    yield "gadget beside a good vector", "sneaky.pt", lambda p: torch.save(
        {"string_to_param": {"*": _vec(1)}, "extra": [(_SystemGadget(marker),)]}, p)
    yield "legacy pickle .bin", "evil.bin", lambda p: p.write_bytes(
        pickle.dumps({"<tok>": _Gadget(marker)}, protocol=2))

    def in_parameter_dict(p):
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(_vec(1))})
        params.__dict__["payload"] = _Gadget(marker)  # the one allowed class must not carry code
        torch.save({"string_to_param": params}, p)

    yield "gadget inside an (allowed) ParameterDict", "pd.pt", in_parameter_dict


def test_the_gadget_is_live(tmp_path):
    """Control: plain pickle would run it (so the refusal test below means something)."""
    marker = tmp_path / "RAN"
    pickle.loads(pickle.dumps(_Gadget(marker)))
    assert marker.exists()


def test_pickle_gadgets_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    for label, name, write in _hostile_files(tmp_path, marker):
        path = tmp_path / name
        write(path)
        with pytest.raises(EmbeddingError) as info:
            load_embedding(path)
        _one_line_about(info.value, path, "refused")
        assert not marker.exists(), f"{label}: the pickle's code ran"


def test_gadget_in_a_folder_is_a_problem_not_a_crash(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": _Gadget(marker)}}, folder / "evil.pt")
    write_emb_params(folder / "good.safetensors", _vec(1))
    db = EmbeddingDB(folder)
    assert list(db.by_name) == ["good"]
    assert len(db.problems) == 1 and "evil.pt" in db.problems[0] and "refused" in db.problems[0]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Files that can't be used: one line naming the file and the reason
# --------------------------------------------------------------------------------------------


def test_wrong_width_is_refused_in_one_line(tmp_path):
    cases = [
        (write_a1111_pt(tmp_path / "sd2-neg.pt", _vec(2, width=1024)), ["1024 wide", "Stable Diffusion 2", "768"]),
        (write_emb_params(tmp_path / "xl-g.safetensors", _vec(2, width=1280)), ["1280 wide", "SDXL", "768"]),
        (write_diffusers_bin(tmp_path / "small.bin", torch.randn(512)), ["512 wide", "768"]),
    ]
    xl = tmp_path / "negativeXL.safetensors"
    save_file({"clip_l": _vec(2, width=768), "clip_g": _vec(2, width=1280)}, str(xl))
    cases.append((xl, ["SDXL", "clip_g [2, 1280]"]))
    for path, words in cases:
        with pytest.raises(EmbeddingError) as info:
            load_embedding(path)
        _one_line_about(info.value, path, *words)
        assert isinstance(info.value, CheckpointError)  # callers that catch checkpoint errors catch these too


def test_unusable_files_are_refused_in_one_line(tmp_path):
    def save(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    good = write_emb_params(tmp_path / "good.safetensors", _vec(2))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not an embedding at all\n" * 4)
    cut_pt = tmp_path / "cut.pt"
    write_a1111_pt(cut_pt, _vec(2))
    cut_pt.write_bytes(cut_pt.read_bytes()[:200])
    lora = tmp_path / "a-lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(4, 4), "lora_unet_up.weight": torch.zeros(4, 4)}, str(lora))

    cases = {
        truncated: "not a readable safetensors file",
        empty: "the file is empty",
        junk: "not an embedding",
        cut_pt: "damaged or truncated",
        lora: "holds 2 tensors",
        save("no-tensor.pt", {"name": "x", "step": 3}): "no tensor",
        save("a-list.pt", [torch.zeros(W)]): "holds a list",
        save("two-terms.pt", {"string_to_param": {"*": _vec(1), "+": _vec(1)}}): "2 terms",
        save("ints.pt", {"string_to_param": {"*": torch.zeros(2, W, dtype=torch.int64)}}): "int64",
        save("cube.pt", {"string_to_param": {"*": torch.zeros(1, 2, W)}}): "[1, 2, 768]",
        save("none.pt", {"string_to_param": {"*": torch.zeros(0, W)}}): "no vectors",
        save("long.pt", {"string_to_param": {"*": torch.zeros(76, W)}}): "76 vectors",
        save("nan.pt", {"string_to_param": {"*": torch.full((2, W), float("nan"))}}): "NaN",
    }
    for path, reason in cases.items():
        with pytest.raises(EmbeddingError) as info:
            load_embedding(path)
        _one_line_about(info.value, path, reason)

    missing = tmp_path / "missing.pt"
    with pytest.raises(EmbeddingError) as info:
        load_embedding(missing)
    _one_line_about(info.value, missing, "cannot read")


def test_75_vectors_is_the_most(tmp_path):
    assert load_embedding(write_a1111_pt(tmp_path / "full.pt", _vec(75))).n_vectors == 75


def test_a_huge_file_is_not_read(tmp_path, monkeypatch):
    path = write_emb_params(tmp_path / "model.safetensors", _vec(8))
    monkeypatch.setattr(E, "MAX_FILE_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a huge file"))
    with pytest.raises(EmbeddingError) as info:
        load_embedding(path)
    _one_line_about(info.value, path, "too large")


# --------------------------------------------------------------------------------------------
# A folder of embeddings
# --------------------------------------------------------------------------------------------


def _folder(tmp_path: Path) -> Path:
    f = tmp_path / "embeddings"
    (f / "negatives").mkdir(parents=True)
    write_a1111_pt(f / "Style.pt", _vec(2, seed=10))
    write_emb_params(f / "negatives" / "easynegative.safetensors", _vec(8, seed=11))
    write_diffusers_bin(f / "cat-toy.BIN", torch.randn(W))  # extensions in any case, as A1111
    write_a1111_pt(f / "sd2.pt", _vec(1, width=1024))
    (f / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    (f / "notes.txt").write_text("not an embedding")
    (f / "cat-toy.preview.png").write_bytes(b"\x89PNG\r\n")
    (f / ".hidden.pt").write_bytes(b"junk")  # e.g. macOS ._ files
    return f


def test_db_loads_the_good_files_and_lists_the_bad(tmp_path):
    f = _folder(tmp_path)
    db = EmbeddingDB(f, W)
    assert list(db.by_name) == ["cat-toy", "easynegative", "Style"]  # case-insensitive order, as A1111
    assert db.by_name["easynegative"].n_vectors == 8
    assert db.by_name["easynegative"].path == f / "negatives" / "easynegative.safetensors"  # found in subfolders
    assert "Style" in db and len(db) == 3
    problems = db.problems
    assert len(problems) == 2, problems
    assert all("\n" not in line for line in problems)
    assert any(str(f / "sd2.pt") in line and "1024 wide" in line for line in problems)
    assert any(str(f / "broken.safetensors") in line for line in problems)


def test_db_same_name_twice_keeps_one_and_says_so(tmp_path):
    f = tmp_path / "embeddings"
    (f / "a").mkdir(parents=True)
    (f / "b").mkdir()
    write_emb_params(f / "a" / "neg.safetensors", _vec(1, seed=1))
    write_a1111_pt(f / "b" / "neg.pt", _vec(1, seed=2))
    db = EmbeddingDB(f)
    assert db.by_name["neg"].path == f / "a" / "neg.safetensors"
    assert len(db.problems) == 1
    assert str(f / "b" / "neg.pt") in db.problems[0] and "not used" in db.problems[0]


def test_db_missing_folder_and_several_folders(tmp_path):
    one = _folder(tmp_path)
    two = tmp_path / "more"
    two.mkdir()
    write_emb_params(two / "extra.safetensors", _vec(1))
    write_emb_params(two / "Style.safetensors", _vec(1))  # the first folder's Style wins
    gone = tmp_path / "gone"
    db = EmbeddingDB([one, two, gone])
    assert set(db.by_name) == {"cat-toy", "easynegative", "Style", "extra"}
    assert db.by_name["Style"].path == one / "Style.pt"
    assert any(str(gone) in line and "no such folder" in line for line in db.problems)
    assert any(str(two / "Style.safetensors") in line for line in db.problems)


def test_db_survives_a_link_loop(tmp_path):
    f = tmp_path / "embeddings"
    f.mkdir()
    write_emb_params(f / "one.safetensors", _vec(1))
    try:
        (f / "loop").symlink_to(f, target_is_directory=True)
    except OSError:
        pytest.skip("no symlinks here")
    db = EmbeddingDB(f)
    assert list(db.by_name) == ["one"] and db.problems == []


def test_db_reload_reads_only_what_changed(tmp_path, monkeypatch):
    f = tmp_path / "embeddings"
    f.mkdir()
    write_emb_params(f / "a.safetensors", _vec(1, seed=1))
    write_emb_params(f / "b.safetensors", _vec(1, seed=2))
    (f / "bad.pt").write_bytes(b"nope")
    db = EmbeddingDB(f)
    assert list(db.by_name) == ["a", "b"] and len(db.problems) == 1

    reads: list[str] = []
    real = E.load_embedding
    monkeypatch.setattr(embedding_db, "load_embedding", lambda p, w=768: reads.append(Path(p).name) or real(p, w))
    assert db.reload() is False and reads == [] and len(db.problems) == 1

    write_emb_params(f / "c.safetensors", _vec(1, seed=3))
    write_emb_params(f / "b.safetensors", _vec(2, seed=4))
    os.utime(f / "b.safetensors", ns=(1, 1))  # a different mtime, whatever the clock's resolution
    (f / "a.safetensors").unlink()
    assert db.reload() is True
    assert sorted(reads) == ["b.safetensors", "c.safetensors"]
    assert list(db.by_name) == ["b", "c"] and db.by_name["b"].n_vectors == 2
    assert len(db.problems) == 1


# --------------------------------------------------------------------------------------------
# Finding trigger words in token ids
# --------------------------------------------------------------------------------------------


class FakeTokenizer:
    """Word-level stand-in for CLIP's tokenizer: lower-cased words and punctuation, one id each."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str) -> list[int]:
        self.calls += 1
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
        return [self.vocab.setdefault(w, 1000 + len(self.vocab)) for w in words]


def _find_db(tmp_path: Path, *names: str) -> EmbeddingDB:
    f = tmp_path / "embeddings"
    f.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        write_emb_params(f / f"{name}.safetensors", _vec(i + 1, seed=i))
    return EmbeddingDB(f)


def test_find_longest_match_first(tmp_path):
    db = _find_db(tmp_path, "bad", "bad_hands", "bad_hands_v2", "easynegative")
    tok = FakeTokenizer()
    ids = tok("masterpiece, bad_hands_v2, bad_hands, bad feet, easynegative")

    def at(i):
        hit = db.find(ids, i, tok)
        return None if hit is None else (hit[0].name, hit[1])

    assert at(0) is None  # masterpiece
    assert at(2) == ("bad_hands_v2", 5)  # bad _ hands _ v2
    assert at(8) == ("bad_hands", 3)
    assert at(12) == ("bad", 1)
    assert at(13) is None  # feet
    assert at(15) == ("easynegative", 1)
    assert at(len(ids)) is None and at(-1) is None


def test_find_at_the_end_of_the_ids_does_not_overrun(tmp_path):
    db = _find_db(tmp_path, "bad", "bad_hands")
    tok = FakeTokenizer()
    ids = tok("bad")  # bad_hands starts the same but the ids end
    assert db.find(ids, 0, tok)[0].name == "bad"
    ids = tok("very bad_")
    assert db.find(ids, 1, tok)[0].name == "bad"


def test_find_tokenizes_the_trigger_words_once(tmp_path):
    db = _find_db(tmp_path, "one", "two_words")
    tok = FakeTokenizer()
    ids = tok("one two words")
    tok.calls = 0
    for i in range(len(ids)):
        db.find(ids, i, tok)
    assert tok.calls == 2  # once per embedding, on the first find


def test_find_trigger_words_the_tokenizer_cannot_tell_apart(tmp_path):
    db = _find_db(tmp_path, "EasyNegative", "easynegative", "___")
    tok = FakeTokenizer()
    hit = db.find(tok("easynegative"), 0, tok)
    assert hit is not None and hit[0].name == "EasyNegative" and hit[1] == 1
    problems = db.problems
    assert any("easynegative.safetensors" in p and "reads the same as 'EasyNegative'" in p for p in problems), problems
    hit = db.find(tok("___"), 0, tok)
    assert hit is not None and hit[0].name == "___"  # three "_" tokens
