"""The top-level command line (issue 12): --version, the app without a terminal, bare ``cache``,
the short render flags, --threads."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_version_prints_the_version_fast():
    """``sdterm --version``: 'sdterm X.Y.Z', exit 0, without importing torch."""
    import sdterm

    code = (
        "import sys\n"
        "from sdterm.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == [f"sdterm {sdterm.__version__}", "exit 0", "False"], proc.stderr


class _Tty:
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin_tty", [False, True])
def test_app_without_a_terminal_says_so(run_cli, monkeypatch, stdin_tty):
    """``sdterm`` with stdin or stdout not a TTY (ssh without -t, a pipe): one line, exit 1, no Textual.
    Under pytest's capture stdout is not a TTY."""
    import io

    monkeypatch.setattr(sys, "stdin", _Tty() if stdin_tty else io.StringIO(""))
    code, out, err = run_cli("--demo")
    assert code == 1
    assert err.startswith("sdterm: error: the app needs a terminal") and len(err.strip().splitlines()) == 1
    assert "ssh -t" in err and "sdterm generate" in err
    assert out == ""


def test_require_terminal_accepts_two_terminals():
    from sdterm.cli.app import require_terminal

    require_terminal(_Tty(), _Tty())


def test_bare_cache_shows_the_stats(run_cli):
    """``sdterm cache`` with no action is ``sdterm cache stats``."""
    code, out, err = run_cli("cache")
    assert code == 0, err
    assert out == run_cli("cache", "stats")[1]
    assert out.startswith("path ") and "entries" in out
    code, out, err = run_cli("cache", "--json")
    assert code == 0 and '"entries"' in out


@pytest.mark.parametrize("command", [["generate", "x"], []])
def test_short_render_flags(command, capsys):
    """-s steps, -S seed, -C cfg, -W width, -H height, on generate and the app; -h is still help."""
    from sdterm.cli import build_parser

    args = build_parser().parse_args([*command, "-s", "30", "-S", "5", "-C", "6.5", "-W", "640", "-H", "384"])
    assert (args.steps, args.seed, args.cfg, args.width, args.height) == (30, 5, 6.5, 640, 384)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "-h"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_short_render_flags_on_a_batch_line(tmp_path):
    from sdterm.cli.generate import _batch_jobs
    from sdterm.cli import build_parser

    batch = tmp_path / "b.txt"
    batch.write_text("a fox -S 3 -s 4 -W 64 -H 128 -C 2\n")
    base = build_parser().parse_args(["generate", "--from-file", str(batch)])
    [(where, job)] = _batch_jobs(str(batch), base)
    assert (job.prompt, job.seed, job.steps, job.width, job.height, job.cfg) == ("a fox", 3, 4, 64, 128, 2.0)


@pytest.fixture
def thread_calls(monkeypatch):
    """torch.set_num_threads recorded, not applied (the test process keeps its threads)."""
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    return calls


SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]


def test_threads_flag_and_setting(demo_model, tmp_path, run_cli, thread_calls):
    """--threads N sets torch's CPU threads; defaults.threads in sdterm.yaml when the flag is left
    out; neither: torch's default is left alone."""
    from sdterm import paths

    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    assert thread_calls == []
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, "--threads", 3, *SMALL)
    assert code == 0, err
    assert thread_calls == [3]
    settings = paths.user_config_file()
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text("defaults:\n  threads: 2\n")
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 0, err
    assert thread_calls == [3, 2]
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, "--threads", 1, *SMALL)
    assert code == 0, err
    assert thread_calls == [3, 2, 1]  # the flag wins
    settings.write_text("defaults:\n  threads: -1\n")
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == 1 and "defaults.threads" in err


def test_app_takes_threads(run_cli):
    from sdterm.cli import build_parser

    assert build_parser().parse_args(["--threads", "4"]).threads == 4


def test_an_unknown_flag_is_blamed_on_its_own_command(capsys):
    """argparse reports a subcommand's unknown flag with the top-level usage: `generate --bogus x`
    must show generate's usage and name generate (issue 12)."""
    from sdterm.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a fox", "--bogus", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: sdterm generate ")
    assert "sdterm generate: error: unrecognized arguments: --bogus x" in err
    with pytest.raises(SystemExit) as exit_:
        main(["--bogus"])
    assert exit_.value.code == 2 and "sdterm: error: unrecognized arguments: --bogus" in capsys.readouterr().err
