"""The render history on disk (locking, repair, numbering), its search and the Up/Down recall."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdterm.history import History, HistoryEntry, Recall, history_file
from sdterm.params import Params


def entry(prompt: str = "a red fox", *, time: str = "2024-05-01T12:00:00+00:00", path: str | None = "outputs/00000-1.png",
          model_hash: str = "abcd1234", **params) -> HistoryEntry:
    return HistoryEntry(Params(prompt, **{"seed": 1, **params}), path, model_hash, time)


# ---- history on disk ----------------------------------------------------------------------------


def test_history_file_is_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTERM_DATA_DIR", str(tmp_path / "data"))
    assert history_file() == tmp_path / "data" / "history.jsonl"


def test_entry_json_round_trip_one_line():
    e = entry("line one\nline two \u2028 «ünïcode»", negative="blurry", path=None, cfg=7.0, subseed_strength=0.25,
              subseed=99, eta=0.5)
    line = e.to_json()
    assert "\n" not in line
    back = HistoryEntry.from_json(line)
    assert back == e
    assert isinstance(back.params.cfg, float)


def test_history_round_trip_creates_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "history.jsonl"
    h = History(path)
    assert h.entries == [] and h.skipped == 0
    a, b = entry("first", seed=1), entry("second \u2028 with a line separator", seed=2, path=None)
    h.append(a)
    h.append(b)
    assert h.entries == [a, b]
    again = History(path)
    assert again.entries == [a, b] and again.skipped == 0
    assert path.read_text(encoding="utf-8").count("\n") == 2


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "[1, 2, 3]",
        '"just a string"',
        "{}",
        json.dumps({**json.loads(entry().to_json()), "seed": "1"}),  # wrong type
        json.dumps({**json.loads(entry().to_json()), "seed": True}),
        json.dumps({**json.loads(entry().to_json()), "cfg": "7.5"}),
        json.dumps({**json.loads(entry().to_json()), "path": 3}),
        json.dumps({**json.loads(entry().to_json()), "steps": 0}),  # out of range
        json.dumps({**json.loads(entry().to_json()), "cfg": 10**400}),
        json.dumps({**json.loads(entry().to_json()), "width": 513}),
        json.dumps({**json.loads(entry().to_json()), "time": "yesterday"}),
        entry().to_json().replace('"cfg":7.5', '"cfg":NaN'),
        {k: v for k, v in json.loads(entry().to_json()).items() if k != "model_hash"},  # missing key
        "[" * 100000,
    ],
)
def test_from_json_rejects_malformed(bad):
    line = bad if isinstance(bad, str) else json.dumps(bad)
    with pytest.raises(ValueError):
        HistoryEntry.from_json(line)


def test_from_json_ignores_unknown_keys():
    data = {**json.loads(entry().to_json()), "added_by_a_newer_sdterm": 1}
    assert HistoryEntry.from_json(json.dumps(data)) == entry()


def test_corrupt_lines_are_moved_aside_once_and_later_appends_still_load(tmp_path):
    path = tmp_path / "history.jsonl"
    good = entry("good")
    wrong_type = json.dumps({**json.loads(entry().to_json()), "steps": "many"})  # a JSON object: kept
    path.write_bytes(
        (good.to_json() + "\n" + "garbage {\n" + wrong_type + "\n\n").encode() + b"\xff\xfe not utf-8\n"
    )
    h = History(path)
    assert h.entries == [good]
    assert (h.repaired, h.skipped, h.quarantine) == (2, 1, tmp_path / "history.jsonl.bad")
    assert path.read_bytes() == (good.to_json() + "\n" + wrong_type + "\n").encode()
    assert h.quarantine.read_bytes() == b"garbage {\n\xff\xfe not utf-8\n"
    again = History(path)  # reported once
    assert (again.entries, again.repaired, again.skipped, again.quarantine) == ([good], 0, 1, None)
    # A crash in the middle of a write: half a line, no newline at the end.
    torn = entry("torn").to_json()
    with open(path, "ab") as f:
        f.write(torn[: len(torn) // 2].encode())
    h = History(path)
    assert h.entries == [good] and h.repaired == 1 and h.skipped == 1
    after = entry("after the crash", seed=3)
    h.append(after)
    assert h.entries == [good, after]
    reloaded = History(path)
    assert reloaded.entries == [good, after] and reloaded.repaired == 0
    assert path.read_bytes().endswith(b"\n")
    # appended to, never overwritten
    assert h.quarantine.read_bytes() == b"garbage {\n\xff\xfe not utf-8\n" + torn[: len(torn) // 2].encode() + b"\n"


def test_torn_last_line_then_append_without_repair(tmp_path):
    """The torn line is not repaired (a History made before the crash appends): the new line must not
    be glued onto it, and both it and the old entries read back."""
    path = tmp_path / "history.jsonl"
    old = [entry("one", seed=1), entry("two", seed=2)]
    h = History(path)
    for e in old:
        h.append(e)
    torn = entry("torn").to_json()
    with open(path, "ab") as f:
        f.write(torn[:40].encode())
    new = entry("new", seed=3)
    h.append(new)
    back = History(path)
    assert back.entries == old + [new]
    assert back.repaired == 1 and back.quarantine.read_text() == torn[:40] + "\n"


def test_read_only_history_is_read_and_skipped_as_before(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "history.jsonl"
    good = entry("good")
    path.write_bytes(good.to_json().encode() + b"\n" + b"torn {")
    folder.chmod(0o555)
    path.chmod(0o444)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root: read-only files are writable")
        h = History(path)
        assert h.entries == [good] and h.skipped == 1 and h.repaired == 0 and h.quarantine is None
        assert path.read_bytes().endswith(b"torn {")
        assert not (folder / "history.jsonl.bad").exists()
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("fail", ["temp file", "lock file"])
def test_a_history_that_cannot_be_rewritten_is_skipped_as_before(tmp_path, monkeypatch, fail):
    """What a read-only folder does, also where the tests run as root."""
    import errno

    import sdterm.history as module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "read-only file system")

    if fail == "temp file":
        monkeypatch.setattr(module, "write_temp", read_only)
    else:
        real_open = os.open
        monkeypatch.setattr(module.os, "open", lambda p, *a, **k: read_only() if str(p).endswith(".lock") else real_open(p, *a, **k))
    path = tmp_path / "history.jsonl"
    path.write_bytes(entry().to_json().encode() + b"\n" + b"torn {")
    h = History(path)
    assert h.entries == [entry()] and h.skipped == 1 and h.repaired == 0 and h.quarantine is None
    assert path.read_bytes().endswith(b"torn {")
    assert not (tmp_path / "history.jsonl.bad").exists()


def test_repair_keeps_the_file_mode_and_a_symlink(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_bytes(entry().to_json().encode() + b"\njunk\n")
    real.chmod(0o600)
    link = tmp_path / "history.jsonl"
    link.symlink_to(real)
    h = History(link)
    assert h.repaired == 1 and link.is_symlink()
    assert (real.stat().st_mode & 0o777) == 0o600
    assert History(link).entries == [entry()]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_two_history_objects_on_one_file_interleave_cleanly(tmp_path):
    path = tmp_path / "history.jsonl"
    one, two = History(path), History(path)
    written = []
    for i in range(10):
        for h, who in ((one, "one"), (two, "two")):
            e = entry(f"{who} {i}", seed=i)
            h.append(e)
            written.append(e)
    loaded = History(path)
    assert loaded.entries == written
    assert loaded.skipped == 0


_APPENDER = """
import sys
from sdterm.history import History, HistoryEntry
from sdterm.params import Params
h = History(sys.argv[1])
for i in range(int(sys.argv[3])):
    h.append(HistoryEntry(Params(sys.argv[2] + " " + "x" * 5000 + str(i), seed=i), None, "h", "2024-05-01T12:00:00+00:00"))
"""


def test_two_processes_appending_at_once_never_tear_lines(tmp_path):
    path = tmp_path / "history.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), who, "40"]) for who in ("one", "two")
    ]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    loaded = History(path)
    assert loaded.skipped == 0
    assert len(loaded.entries) == 80
    for who in ("one", "two"):
        mine = [e.params.seed for e in loaded.entries if e.params.prompt.startswith(who + " ")]
        assert mine == list(range(40))  # each writer's own lines stay in order


def test_append_raises_oserror(tmp_path):
    blocker = tmp_path / "not-a-folder"
    h = History(blocker / "history.jsonl")
    blocker.write_text("a file where the folder should be")
    with pytest.raises(OSError):
        h.append(entry())
    assert h.entries == []


def test_prompts_newest_first_without_consecutive_duplicates(tmp_path):
    h = History(tmp_path / "history.jsonl")
    for e in [
        entry("fox", seed=1),
        entry("fox", seed=1, time="2024-05-02T00:00:00+00:00", path="other.png"),  # same render again
        entry("owl", seed=1),
        entry("fox", seed=1),  # not consecutive with the first two: kept
        entry("fox", seed=2),  # other parameters: kept
        entry("fox", seed=2),
    ]:
        h.append(e)
    assert [(e.params.prompt, e.params.seed) for e in h.prompts()] == [("fox", 2), ("fox", 1), ("owl", 1), ("fox", 1)]


# ---- search -------------------------------------------------------------------------------------


def _history(tmp_path, prompts) -> History:
    h = History(tmp_path / "history.jsonl")
    for i, p in enumerate(prompts):
        h.append(entry(p, seed=i))
    return h


def test_search_fuzzy_subsequence(tmp_path):
    h = _history(tmp_path, ["a red fox", "a blue whale", "portrait of an owl"])
    assert [e.params.prompt for e in h.search("rdfx")] == ["a red fox"]
    assert [e.params.prompt for e in h.search("RED FOX")] == ["a red fox"]
    assert h.search("zebra") == []


def test_search_ranking(tmp_path):
    h = _history(tmp_path, [
        "fox in the snow",          # prefix (oldest)
        "a fox at night",           # word-start substring
        "firefox logo",             # substring inside a word
        "four oxen",                # scattered, newest
        "fancy pink ox",            # scattered
    ])
    assert [e.params.prompt for e in h.search("fox")] == [
        "fox in the snow", "a fox at night", "firefox logo", "four oxen", "fancy pink ox",
    ]


def test_search_prefers_word_starts_then_newer(tmp_path):
    h = _history(tmp_path, ["a red fox", "hardware fix", "surfing"])
    # A contiguous match first; then letters on word starts (r, f of "a red fox") beat letters
    # inside words (r, d of "hardware"), although "hardware fix" is newer.
    assert [e.params.prompt for e in h.search("rf")] == ["surfing", "a red fox", "hardware fix"]
    assert [e.params.prompt for e in h.search("rdfx")] == ["a red fox", "hardware fix"]
    same = _history(tmp_path / "b", ["cat one", "cat two", "cat three"])
    assert [e.params.prompt for e in same.search("cat")] == ["cat three", "cat two", "cat one"]


def test_search_dedupes_and_limits(tmp_path):
    h = History(tmp_path / "history.jsonl")
    for _ in range(3):
        h.append(entry("a red fox"))
    h.append(entry("a red fox", seed=9))
    for i in range(10):
        h.append(entry(f"red {i}"))
    results = h.search("red", limit=100)
    assert sum(e.params.prompt == "a red fox" for e in results) == 2
    assert len(h.search("red", limit=3)) == 3
    assert [e.params.prompt for e in h.search("", limit=2)] == ["red 9", "red 8"]


# ---- recall -------------------------------------------------------------------------------------


def test_recall_older_newer_restores_draft(tmp_path):
    h = _history(tmp_path, ["one", "two", "three"])
    r = Recall(h)
    assert r.newer() is None  # already at the present
    assert r.older("my draft").params.prompt == "three"
    assert r.older("three").params.prompt == "two"  # later calls do not overwrite the draft
    assert r.older("two").params.prompt == "one"
    assert r.older("one") is None  # the oldest: stays
    assert r.newer().params.prompt == "two"
    assert r.newer().params.prompt == "three"
    assert r.newer() == "my draft"
    assert r.newer() is None
    # After a reset the next Up remembers a new draft and starts from the newest again.
    r.older("x")
    r.reset()
    h.append(entry("four"))
    assert r.older("new draft").params.prompt == "four"
    assert r.newer() == "new draft"


def test_recall_empty_history(tmp_path):
    r = Recall(History(tmp_path / "history.jsonl"))
    assert r.older("draft") is None
    assert r.newer() is None


# ---- numbered history, by image -----------------------------------------------------------------


def test_numbered_get_and_last(tmp_path):
    h = _history(tmp_path, ["one", "two", "three"])
    assert [(n, e.params.prompt) for n, e in h.numbered()] == [(1, "one"), (2, "two"), (3, "three")]
    assert [n for n, _ in h.numbered(2)] == [2, 3]
    assert [n for n, _ in h.numbered(10)] == [1, 2, 3]
    assert h.numbered(0) == []
    assert h.get(1).params.prompt == "one" and h.get(3).params.prompt == "three"
    assert h.get(0) is None and h.get(4) is None and h.get(-1) is None


def test_numbers_stay_in_file_order_with_another_writer(tmp_path):
    """Another process (a `generate`) appends between this one's renders: numbers follow the file."""
    path = tmp_path / "history.jsonl"
    app, other = History(path), History(path)
    app.append(entry("app 1"))
    other.append(entry("generate 1"))
    assert app.get(2).params.prompt == "generate 1"  # seen without a restart
    app.append(entry("app 2"))
    expected = ["app 1", "generate 1", "app 2"]
    assert [e.params.prompt for _, e in app.numbered()] == expected
    assert [e.params.prompt for _, e in History(path).numbered()] == expected


def test_by_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = History(tmp_path / "history.jsonl")
    h.append(entry("a", path="outputs/00042-1234.png"))
    h.append(entry("b", path="elsewhere/00042-99.png"))
    h.append(entry("c", path=None))
    h.append(entry("d", path=str(tmp_path / "outputs" / "00007-5.png")))
    assert h.by_image("00042-1234.png").params.prompt == "a"
    assert h.by_image("00042-1234").params.prompt == "a"
    assert h.by_image("42").params.prompt == "b"  # the newest with that number
    assert h.by_image("00042").params.prompt == "b"
    assert h.by_image("outputs/00042-1234.png").params.prompt == "a"
    assert h.by_image(str(tmp_path / "outputs" / "00042-1234.png")).params.prompt == "a"
    assert h.by_image("outputs/00007-5.png").params.prompt == "d"
    assert h.by_image("7").params.prompt == "d"
    for missing in ("43", "nothing.png", "other/00042-1234.png", "", "  ", "٤٢", "²"):
        assert h.by_image(missing) is None, missing


# ---- several processes at once --------------------------------------------------------------------


def _append_many(path: str, who: str, count: int) -> None:
    h = History(Path(path))
    for i in range(count):
        h.append(HistoryEntry(Params(f"{who} {i} " + "x" * 3000, seed=i), None, "h", "2024-05-01T12:00:00+00:00"))


def _crash_and_repair(path: str, count: int) -> None:
    """A writer that dies mid-line (under the lock, as a crashing sdterm would), then a fresh start."""
    from sdterm.history import _append_bytes, _locked  # noqa: PLC2701 (a test of the lock itself)

    for i in range(count):
        with _locked(Path(path)):
            _append_bytes(Path(path), b'{"time": "torn ' + str(i).encode())
        History(Path(path))  # repairs: must never drop a line another process is appending


def test_concurrent_appends_and_repairs_keep_every_line(tmp_path):
    path = tmp_path / "history.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), f"p{k}", 50)) for k in range(4)]
    procs.append(ctx.Process(target=_crash_and_repair, args=(str(path), 30)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 5
    loaded = History(path)
    assert len(loaded.entries) == 200
    for k in range(4):
        assert [e.params.seed for e in loaded.entries if e.params.prompt.startswith(f"p{k} ")] == list(range(50))
    bad = (tmp_path / "history.jsonl.bad").read_bytes().split(b"\n")
    assert all(line.startswith(b'{"time": "torn ') for line in bad if line)  # no entry went there
    assert loaded.skipped == 0


def test_sampler_fields_round_trip_and_a_newer_sdterms_sampler_stays_in_the_file(tmp_path):
    """Issue 13: the sampler, schedule, rng, eta and ENSD are in each line; a line naming a sampler
    this sdterm doesn't have (a newer one wrote it) is skipped, not moved aside or dropped."""
    path = tmp_path / "history.jsonl"
    h = History(path)
    mine = HistoryEntry(Params("fox", sampler="DPM++ SDE", schedule="Exponential", rng="nv", eta_ancestral=0.5,
                               ensd=31337), "a.png", "h", "2024-05-01T12:00:00+00:00")
    h.append(mine)
    line = json.loads(path.read_text().splitlines()[0])
    assert {k: line[k] for k in ("sampler", "schedule", "rng", "eta_ancestral", "ensd")} == {
        "sampler": "DPM++ SDE", "schedule": "Exponential", "rng": "nv", "eta_ancestral": 0.5, "ensd": 31337}
    newer = dict(line, sampler="Sampler From The Future", prompt="cat")
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(newer) + "\n")
    loaded = History(path)
    assert loaded.entries == [mine] and loaded.skipped == 1 and loaded.repaired == 0
    assert "Sampler From The Future" in path.read_text()
