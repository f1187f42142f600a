"""The process-wide window between CUDA-graph captures and compilations (shared/cuda_capture.py), on the CPU.

On an H100 the local stack's scene compiled its encoder while its in-process guidance captured a graph, and both
fell back to eager. Here: a capture never starts while the window is held (that call runs eagerly, a later one
captures), and an encoder's compilation runs inside the window.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from services.guidance.priors.cuda_graphs import GraphedForward
from services.scene.latent_encoders import CompiledEncoder
from shared.cuda_capture import capture_window_taken, exclusive_capture_window


def test_the_window_is_exclusive_and_a_non_blocking_caller_is_told_it_is_taken():
    held, release = threading.Event(), threading.Event()

    def holder():
        with exclusive_capture_window():
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5)
    with exclusive_capture_window(blocking=False) as free:
        assert free is False
    release.set()
    thread.join(5)
    with exclusive_capture_window(blocking=False) as free:
        assert free is True
    assert not capture_window_taken()


def test_a_new_shape_runs_eagerly_while_the_window_is_taken_and_is_captured_later(monkeypatch):
    graphed, captures = GraphedForward(), []

    def fake_capture(forward, inputs):
        captures.append(tuple(inputs[0].shape))
        return None  # as a failed capture: the shape runs eagerly from then on

    monkeypatch.setattr(graphed, "_capture", fake_capture)
    double = lambda x: x * 2  # noqa: E731
    x = torch.ones(2, 3)
    with exclusive_capture_window():  # another thread compiling, say
        assert torch.equal(graphed(double, x), x * 2)
    assert captures == []  # nothing captured, nothing recorded as failed: a later call tries
    assert torch.equal(graphed(double, x), x * 2)
    assert torch.equal(graphed(double, x), x * 2)
    assert captures == [(2, 3)]  # captured once, when the window was free


def test_an_encoder_compiles_inside_the_window():
    window_taken_while_compiling = []

    def backend(graph_module, example_inputs):
        window_taken_while_compiling.append(capture_window_taken())
        return graph_module.forward

    encoder = CompiledEncoder(nn.Conv2d(3, 4, 3, padding=1), backend, on_fallback=lambda error: None)
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    encoder(images).sum().backward()
    assert encoder.compiled and window_taken_while_compiling and all(window_taken_while_compiling)
    assert not capture_window_taken()
