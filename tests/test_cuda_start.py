"""CUDA's start: the driver and the device's context on a thread before a rendering command
imports torch (cuda_driver.py), then torch's initialisation and the process's first calls on a
thread as soon as it has imported torch, beside the model's opening
and the engine's set-up: where it is started, that it is started once, never for ``--device
cpu``, and that a graph capture waits for it. That the context really exists afterwards, and that
the first calls run, is checked on a GPU (tests/test_cuda.py)."""

from __future__ import annotations

import argparse
import threading

import pytest
import torch

from sdterm.cli import engine_setup
from sdterm.engine.memory import cuda_driver, cuda_start, placement


@pytest.fixture
def threads(monkeypatch):
    """The threads ``start_cuda`` (or ``start_driver``) starts, recorded, not run (``threading.Thread``
    is replaced), with ``start_cuda``'s once-per-process memory emptied for the test."""
    started: list[tuple] = []

    class Recorded:
        def __init__(self, target, args=(), name=None, daemon=None):
            self.call = (target, args, name, daemon)

        def start(self):
            started.append(self.call)

    monkeypatch.setattr(cuda_start.threading, "Thread", Recorded)
    monkeypatch.setattr(cuda_start, "_threads", {})
    monkeypatch.setattr(cuda_start, "use_expandable_segments", lambda: None)
    return started


def test_start_cuda_starts_one_daemon_thread_per_device_once(threads):
    cuda_start.start_cuda("cuda", first_calls=True)
    cuda_start.start_cuda("cuda:0")  # the same device: already started
    cuda_start.start_cuda("cuda:1")
    assert [(name, daemon, args) for _, args, name, daemon in threads] == [
        ("sdterm-cuda-init", True, (0, True)), ("sdterm-cuda-init", True, (1, False))]
    assert all(target is cuda_start._start for target, *_ in threads)


def test_a_placement_on_a_gpu_starts_cuda_without_first_calls_unless_the_command_did(threads):
    placement.Placement(torch.device("cuda"))
    placement.Placement(torch.device("cuda"))
    placement.Placement(torch.device("cpu"))
    assert [args for _, args, _, _ in threads] == [(0, False)]


def test_the_start_thread_waits_for_the_driver_before_torch_calls_into_it(monkeypatch):
    """torch's own driver calls hold the GIL: they come only after the driver thread is done."""
    order: list[str] = []
    monkeypatch.setattr(cuda_start, "wait_driver", lambda: order.append("wait driver"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: order.append("torch") and False)
    cuda_start._start(0, True)
    assert order == ["wait driver", "torch"]


def test_start_driver_starts_one_daemon_thread_once(threads, monkeypatch):
    monkeypatch.setattr(cuda_driver, "_thread", None)
    cuda_driver.start_driver(0)
    cuda_driver.start_driver(0)
    assert threads == [(cuda_driver._start, (0,), "sdterm-cuda-driver", True)]


def test_the_driver_start_imports_no_torch_and_ends_quietly_without_a_driver():
    """It runs before torch's import (a subprocess: this one has torch). Where there is no
    libcuda.so.1 (this machine, unless it has a GPU) the thread just ends."""
    import subprocess
    import sys

    probe = ("import sys; from sdterm.engine.memory.cuda_driver import start_driver, wait_driver; "
             "start_driver(0); wait_driver(); print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_without_a_driver_library_the_driver_thread_ends(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(cuda_driver.ctypes, "CDLL", missing)
    cuda_driver._start(0)  # nothing raised


@pytest.mark.parametrize("device, expected", [("auto", [0]), ("cuda", [0]), ("cpu", [])])
def test_start_driver_is_asked_for_unless_the_cpu_is(monkeypatch, device, expected):
    calls: list = []
    monkeypatch.setattr(cuda_driver, "start_driver", lambda index=0: calls.append(index))
    engine_setup.start_driver(argparse.Namespace(device=device))
    assert calls == expected


def test_the_start_thread_is_harmless_without_a_gpu(monkeypatch):
    """On a machine without CUDA (``--device auto`` there), the thread finds none and ends."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    init = []
    monkeypatch.setattr(torch.cuda, "init", lambda: init.append(1))
    cuda_start._start(0, True)
    assert init == []


@pytest.mark.parametrize("device, expected", [("auto", [("cuda", True)]), ("cuda", [("cuda", True)]), ("cpu", [])])
def test_start_device_starts_cuda_with_first_calls_unless_the_cpu_is_asked_for(monkeypatch, device, expected):
    calls: list = []
    monkeypatch.setattr(cuda_start, "start_cuda", lambda name, first_calls=False: calls.append((name, first_calls)))
    engine_setup.start_device(argparse.Namespace(device=device))
    assert calls == expected


def test_generate_starts_cuda_before_it_opens_the_model(demo_model, tmp_path, run_cli, monkeypatch):
    """The start runs beside the model's opening: it is asked for first."""
    from sdterm.cli import generate
    from sdterm.engine import pipeline

    order: list[str] = []
    real_open = pipeline.open_model
    monkeypatch.setattr(generate, "start_driver", lambda args: order.append(f"driver {args.device}"))
    monkeypatch.setattr(generate, "start_device", lambda args: order.append(f"start {args.device}"))
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: order.append("open") or real_open(*a, **k))
    code, _, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--steps", 1, "--width", 64,
                           "--height", 64, "--outdir", tmp_path, "--device", "cpu")
    assert code == 0, err
    assert order == ["driver cpu", "start cpu", "open"]


def test_wait_started_waits_for_the_start_thread_but_never_for_itself(monkeypatch):
    release = threading.Event()
    done: list[str] = []

    def start():
        release.wait(5)
        done.append("start")
        cuda_start.wait_started(torch.device("cuda"))  # its own thread: returns at once

    thread = threading.Thread(target=start)
    monkeypatch.setattr(cuda_start, "_threads", {0: thread})
    thread.start()
    threading.Timer(0.05, release.set).start()
    cuda_start.wait_started(torch.device("cuda", 0))
    assert done == ["start"]
    cuda_start.wait_started(torch.device("cuda", 1))  # never started: nothing to wait for


def test_a_graph_capture_waits_for_the_start_first(monkeypatch):
    """UNetGraphs captures only once the start thread's first calls are over (checked without a
    GPU: the capture itself is replaced)."""
    from sdterm.engine.memory import graphs

    order: list[str] = []
    monkeypatch.setattr(graphs, "wait_started", lambda device: order.append("wait"))
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(graphs.torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(graphs, "_Graph", lambda *a: order.append("capture") or object())
    g = graphs.UNetGraphs(torch.device("cuda"))
    x = torch.zeros(1)
    key = graphs.signature(x, x, x)
    g._peaks[key] = 0
    g._capture(lambda *a: x, key, x, x, x, None)
    assert order == ["wait", "capture"]


def test_verify_starts_cuda_before_it_opens_the_model(demo_model, tmp_path, run_cli, monkeypatch):
    from sdterm.engine import pipeline

    code, out, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--steps", 1, "--width", 64,
                             "--height", 64, "--outdir", tmp_path, "--no-history", "--device", "cpu")
    assert code == 0, err
    order: list[str] = []
    real_open = pipeline.open_model
    monkeypatch.setattr(engine_setup, "start_driver", lambda args: order.append(f"driver {args.device}"))
    monkeypatch.setattr(engine_setup, "start_device", lambda args: order.append(f"start {args.device}"))
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: order.append("open") or real_open(*a, **k))
    code, _, err = run_cli("verify", out.strip(), "--model", demo_model, "--device", "cpu")
    assert code == 0, err
    assert order == ["driver cpu", "start cpu", "open"]
