"""CUDA's start (the driver, torch's initialisation, the device's context) on a thread as soon as
a rendering command has imported torch, beside the model's opening and the engine's set-up:
where it is started, that it is started once, and never for ``--device cpu``. That the context
really exists afterwards is checked on a GPU (tests/test_cuda.py)."""

from __future__ import annotations

import argparse

import pytest

from sdterm.cli import engine_setup
from sdterm.engine.memory import placement


@pytest.fixture
def threads(monkeypatch):
    """The threads ``start_cuda`` starts (recorded, not run), with its once-per-process memory
    emptied for the test."""
    started: list[tuple] = []

    class Recorded:
        def __init__(self, target, args=(), name=None, daemon=None):
            self.call = (target, args, name, daemon)

        def start(self):
            started.append(self.call)

    monkeypatch.setattr(placement.threading, "Thread", Recorded)
    monkeypatch.setattr(placement, "_started", set())
    return started


def test_start_cuda_starts_one_daemon_thread_per_device_once(threads):
    placement.start_cuda("cuda")
    placement.start_cuda("cuda:0")  # the same device: already started
    placement.start_cuda("cuda:1")
    assert [(name, daemon, args) for _, args, name, daemon in threads] == [
        ("sdterm-cuda-init", True, (0,)), ("sdterm-cuda-init", True, (1,))]
    assert all(target is placement._init_cuda for target, *_ in threads)


def test_a_placement_on_a_gpu_starts_cuda_unless_the_command_did(threads, monkeypatch):
    monkeypatch.setattr(placement, "use_expandable_segments", lambda: None)
    import torch

    placement.Placement(torch.device("cuda"))
    placement.Placement(torch.device("cuda"))
    placement.Placement(torch.device("cpu"))
    assert len(threads) == 1


def test_the_start_thread_is_harmless_without_a_gpu(monkeypatch):
    """On a machine without CUDA (``--device auto`` there), the thread finds none and ends."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    init = []
    monkeypatch.setattr(torch.cuda, "init", lambda: init.append(1))
    placement._init_cuda(0)
    assert init == []


@pytest.mark.parametrize("device, expected", [("auto", ["cuda"]), ("cuda", ["cuda"]), ("cpu", [])])
def test_start_device_starts_cuda_unless_the_cpu_is_asked_for(monkeypatch, device, expected):
    calls: list[str] = []
    monkeypatch.setattr(placement, "start_cuda", calls.append)
    engine_setup.start_device(argparse.Namespace(device=device))
    assert calls == expected


def test_generate_starts_cuda_before_it_opens_the_model(demo_model, tmp_path, run_cli, monkeypatch):
    """The start runs beside the model's opening: it is asked for first."""
    from sdterm.cli import generate
    from sdterm.engine import pipeline

    order: list[str] = []
    real_open = pipeline.open_model
    monkeypatch.setattr(generate, "start_device", lambda args: order.append(f"start {args.device}"))
    monkeypatch.setattr(pipeline, "open_model", lambda *a, **k: order.append("open") or real_open(*a, **k))
    code, _, err = run_cli("generate", "a red fox", "--model", demo_model, "--seed", 1, "--steps", 1, "--width", 64,
                           "--height", 64, "--outdir", tmp_path, "--device", "cpu")
    assert code == 0, err
    assert order == ["start cpu", "open"]
