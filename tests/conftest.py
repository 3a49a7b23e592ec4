"""Shared fixtures: the devices to test on; a comparison of weights; Python's SIGINT handler and
the main-thread check of the signal tests.

Without a GPU, the Triton kernels are tested under Triton's interpreter: TRITON_INTERPRET=1 is set
here, before any kernel module is imported (Triton reads it when a kernel is decorated). Each
test picks the path it exercises (see the `implementation` fixtures of the op tests).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICES = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])

requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def sigint_raises_keyboard_interrupt():
    """Python's own SIGINT handler during each test. A process started with SIGINT ignored (a
    background job of a non-interactive shell) keeps it ignored, and then the signal tests' second
    Ctrl-C does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def needs_the_main_thread() -> None:
    """Skips a test that raises signals where Python cannot handle them (a worker thread)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Python sets signal handlers from the main thread only")


def same_state(first: dict, second: dict) -> bool:
    """Two state dicts hold the same names and bit-identical tensors."""
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)

