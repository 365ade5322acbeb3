"""How failures reach the user on the command line: known ones in one line, a bug as an honest
"internal error" with its own exit code, and the traceback with --debug or SDTERM_DEBUG=1."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdterm import cli, errors, show
from sdterm.cli import EXIT_CANCELLED, EXIT_ERROR, EXIT_INTERNAL, UserError
from sdterm.engine.loading.checkpoint import CheckpointError
from sdterm.engine.pipeline import Cancelled, Engine, OutOfMemory
from sdterm.engine.memory.planner import BudgetTooSmall
from sdterm.engine.prompt.tokenizer import PromptError
from sdterm.errors import ConfigError
from sdterm.pngmeta import MetadataError

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]
HOW = "(a bug: run with --debug (or SDTERM_DEBUG=1) for the traceback)"


def fail_with(exc: BaseException):
    def injected(*args, **kwargs):
        raise exc

    return injected


@pytest.fixture
def cache_raises(monkeypatch):
    """``sdterm cache stats`` raises ``exc`` from inside the command (no model needed)."""

    def arm(exc: BaseException) -> None:
        monkeypatch.setattr(cli.cache, "open_cache", fail_with(exc))

    return arm


def test_exit_codes_are_distinct():
    assert (cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_INTERNAL, cli.EXIT_CANCELLED) == (1, 2, 70, 130)


# --------------------------------------------------------------------------------------------
# A bug
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc, line",
    [
        (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero"),
        (RuntimeError("boom\nand more detail"), "RuntimeError: boom"),
        (ValueError("not a user's ValueError"), "ValueError: not a user's ValueError"),
        (KeyError("stage"), "KeyError: 'stage'"),
        (AttributeError(), "AttributeError: AttributeError"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "",
)
def test_a_bug_is_an_internal_error_in_one_line(exc, line, cache_raises, run_cli, monkeypatch):
    monkeypatch.delenv("SDTERM_DEBUG", raising=False)
    cache_raises(exc)
    code, out, err = run_cli("cache", "stats")
    assert code == EXIT_INTERNAL
    assert err == f"sdterm: internal error: {line} {HOW}\n"
    assert "sdterm: error:" not in err and "Traceback" not in err and out == ""


def test_a_bug_in_the_engine_during_generate(demo_model, tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("SDTERM_DEBUG", raising=False)
    monkeypatch.setattr(Engine, "generate", fail_with(RuntimeError("boom")))
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == EXIT_INTERNAL
    assert err.splitlines() == [f"sdterm: internal error: RuntimeError: boom {HOW}"]
    assert out == "" and not list(tmp_path.glob("*.png"))


def injected_bug(*args, **kwargs):
    return 1 / 0


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--debug", "cache", "stats"], None),  # the global flag, before the command
        (["cache", "stats", "--debug"], None),  # after it
        (["cache", "--debug", "stats"], None),
        (["cache", "stats"], "1"),
        (["cache", "stats"], "yes"),
    ],
)
def test_debug_or_sdterm_debug_prints_the_traceback(argv, env, run_cli, monkeypatch):
    if env is None:
        monkeypatch.delenv("SDTERM_DEBUG", raising=False)
    else:
        monkeypatch.setenv("SDTERM_DEBUG", env)
    monkeypatch.setattr(cli.cache, "open_cache", injected_bug)
    code, out, err = run_cli(*argv)
    assert code == EXIT_INTERNAL
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any("injected_bug" in line for line in lines) and "return 1 / 0" in err
    assert lines[-2] == "ZeroDivisionError: division by zero"
    assert lines[-1] == "sdterm: internal error: ZeroDivisionError: division by zero (a bug: the traceback is above)"


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off"])
def test_sdterm_debug_off_values_print_no_traceback(value, run_cli, monkeypatch):
    monkeypatch.setenv("SDTERM_DEBUG", value)
    monkeypatch.setattr(cli.cache, "open_cache", injected_bug)
    code, out, err = run_cli("cache", "stats")
    assert code == EXIT_INTERNAL and "Traceback" not in err and len(err.splitlines()) == 1


def test_debug_is_a_flag_of_every_command():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert any("--debug" in a.option_strings for a in command._actions), name
    assert parser.parse_args(["--debug", "cache", "path"]).debug is True
    assert parser.parse_args(["cache", "path", "--debug"]).debug is True
    assert parser.parse_args(["cache", "path"]).debug is False
    assert parser.parse_args(["generate", "--", "--debug"]).prompt == "--debug"  # a prompt stays a prompt


def test_the_real_process_exits_70_on_a_bug(tmp_path):
    """``python -m sdterm``'s entry point passes the code on; the traceback only with SDTERM_DEBUG."""
    code = ("import sdterm.cli as c\n"
            "def broken(args):\n"
            "    raise RuntimeError('boom')\n"
            "c.cache.run = broken\n"
            "c.entry()\n")
    env = {k: v for k, v in os.environ.items() if k != "SDTERM_DEBUG"}
    plain = subprocess.run([sys.executable, "-c", code, "cache", "path"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert plain.returncode == EXIT_INTERNAL
    assert plain.stderr == f"sdterm: internal error: RuntimeError: boom {HOW}\n"
    debug = subprocess.run([sys.executable, "-c", code, "cache", "path"], capture_output=True, text=True,
                           env={**env, "SDTERM_DEBUG": "1"}, timeout=120)
    assert debug.returncode == EXIT_INTERNAL
    assert debug.stderr.startswith("Traceback (most recent call last):") and "in broken" in debug.stderr


# --------------------------------------------------------------------------------------------
# Known failures: one line, exit 1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        UserError("give a PROMPT or --from-file FILE (one of them)"),
        ConfigError("steps must be between 1 and 1000, got 0"),
        CheckpointError("/m/x.ckpt: this is SDXL; sdterm runs Stable Diffusion v1"),
        PromptError("the prompt is too long"),
        BudgetTooSmall("a 512x512 render needs at least 900 MiB; the budget is 300 MiB"),
        OutOfMemory("out of GPU memory even streamed: try 384x384"),
        MetadataError("a.png: no generation parameters"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_project_errors_are_one_plain_line(exc, cache_raises, run_cli, monkeypatch):
    monkeypatch.delenv("SDTERM_DEBUG", raising=False)
    cache_raises(exc)
    code, out, err = run_cli("cache", "stats")
    assert code == EXIT_ERROR
    assert err == f"sdterm: error: {exc}\n"


def test_download_errors_are_one_plain_line(cache_raises, run_cli):
    from sdterm.download import DownloadError

    cache_raises(DownloadError("the hub asks for a token: run `hf auth login`"))
    code, out, err = run_cli("cache", "stats")
    assert (code, err) == (EXIT_ERROR, "sdterm: error: the hub asks for a token: run `hf auth login`\n")


def test_a_user_error_with_debug_still_ends_in_its_one_line(cache_raises, run_cli):
    cache_raises(UserError("no model"))
    code, out, err = run_cli("--debug", "cache", "stats")
    assert code == EXIT_ERROR and err.splitlines()[-1] == "sdterm: error: no model"


@pytest.mark.parametrize(
    "exc, line",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/srv/models/x.safetensors"),
         "/srv/models/x.safetensors: Permission denied"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "gone.yaml"), "gone.yaml: No such file or directory"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/.a.tmp"), "/out/.a.tmp: No space left on device"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "/a -> /b: Invalid cross-device link"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
        (OSError("Consistency check failed"), "Consistency check failed"),
    ],
    ids=["permission", "missing", "disk-full", "two-paths", "no-path", "no-errno"],
)
def test_os_errors_are_one_line_with_the_path(exc, line, cache_raises, run_cli):
    cache_raises(exc)
    code, out, err = run_cli("cache", "stats")
    assert (code, err) == (EXIT_ERROR, f"sdterm: error: {line}\n")


def test_show_on_a_folder_names_it(tmp_path, run_cli):
    """Not injected: reading a folder as an image fails, in one line naming it."""
    png = tmp_path / "a.png"
    png.mkdir()
    code, out, err = run_cli("show", png)
    assert code == EXIT_ERROR and len(err.splitlines()) == 1 and str(png) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "exc",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    ],
    ids=["torch.cuda.OutOfMemoryError", "RuntimeError"],
)
def test_cuda_out_of_memory_is_the_oom_line(exc, demo_model, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(Engine, "generate", fail_with(exc))
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--outdir", tmp_path, *SMALL)
    assert code == EXIT_ERROR
    first = str(exc).splitlines()[0]
    assert err == f"sdterm: error: out of GPU memory: {first} ({errors.OOM_HINT})\n"


def test_torchs_long_oom_message_is_cut_to_what_was_asked_and_what_is_free():
    exc = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 3.81 GiB of which "
        "3.12 MiB is free. Including non-PyTorch memory, this process has 3.80 GiB memory in use. If reserved "
        "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    failure = errors.classify(exc)
    assert failure.kind == "error" and failure.exit_code == EXIT_ERROR
    assert failure.line == ("out of GPU memory: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total "
                            f"capacity of 3.81 GiB of which 3.12 MiB is free ({errors.OOM_HINT})")


def test_host_memory_error_is_one_line(cache_raises, run_cli):
    cache_raises(MemoryError())
    code, out, err = run_cli("cache", "stats")
    assert code == EXIT_ERROR and err.startswith("sdterm: error: out of memory (RAM)") and len(err.splitlines()) == 1


def test_device_cuda_without_cuda_is_a_user_error(demo_model, tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli("generate", "x", "--model", demo_model, "--device", "cuda", "--outdir", tmp_path, *SMALL)
    assert code == EXIT_ERROR
    assert err.startswith("sdterm: error: --device cuda was asked for") and len(err.splitlines()) == 1


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), Cancelled()], ids=["KeyboardInterrupt", "Cancelled"])
def test_ctrl_c_and_cancel_are_one_line(exc, cache_raises, run_cli):
    cache_raises(exc)
    code, out, err = run_cli("cache", "stats")
    assert (code, err) == (EXIT_CANCELLED, "sdterm: cancelled; nothing was written\n")


def test_a_usage_error_is_still_argparses(run_cli):
    with pytest.raises(SystemExit) as exit_:
        run_cli("generate", "x", "--steps", "many")
    assert exit_.value.code == cli.EXIT_USAGE


def test_show_reports_a_bug_in_its_reader_as_internal(tmp_path, run_cli, monkeypatch):
    """Each command goes through the same guard: here `sdterm show`."""
    monkeypatch.setattr(show, "read_png_parameters", fail_with(IndexError("list index out of range")))
    code, out, err = run_cli("show", tmp_path / "a.png")
    assert code == EXIT_INTERNAL and err == f"sdterm: internal error: IndexError: list index out of range {HOW}\n"


def test_doctor_does_not_file_a_bug_as_a_settings_problem(run_cli, monkeypatch):
    import sdterm.resolve

    monkeypatch.setattr(sdterm.resolve, "user_config", fail_with(TypeError("unhashable type: 'list'")))
    code, out, err = run_cli("doctor")
    assert code == EXIT_INTERNAL and "internal error: TypeError" in err


# --------------------------------------------------------------------------------------------
# The classifier itself
# --------------------------------------------------------------------------------------------


def test_classify_does_not_import_torch():
    code = ("import sys\nfrom sdterm.errors import classify\n"
            "print(classify(OSError(2, 'x', 'f')).kind, classify(ValueError('v')).kind, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.split() == ["error", "internal", "False"]


def test_the_error_log_keeps_tracebacks_and_stays_bounded(monkeypatch):
    monkeypatch.setattr(errors, "ERROR_LOG_MAX", 4000)
    try:
        injected_bug()
    except ZeroDivisionError as exc:
        bug = exc
    for _ in range(40):
        path = errors.log_traceback(bug, "in a test")
    text = path.read_text()
    assert path == errors.error_log_file() and "in injected_bug" in text and "ZeroDivisionError" in text
    assert path.stat().st_size <= 4000 + 2000 and text.startswith("----")


def test_every_named_user_error_class_exists():
    """The classifier finds the project's error types by module and name: a module that moves or a
    class that is renamed must fail here, not silently turn user errors into "internal error"."""
    import importlib

    from sdterm.errors import USER_ERRORS

    for module, name in USER_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), (module, name)
