"""The implementations an op test runs on: every one that this machine can run."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch

import dfkd_fast
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA_AVAILABLE = torch.cuda.is_available()


@dataclass(frozen=True)
class Path:
    name: str
    device: torch.device
    expected: Implementation

    def __str__(self) -> str:
        return self.name


def triton_op_paths(has_cpu_kernel: bool) -> list[Path]:
    """Paths of an op whose GPU kernels are Triton: the interpreter (CPU-only machines), the C++
    CPU kernel if it has one, the CPU reference, and compiled Triton on CUDA."""
    cpu = torch.device("cpu")
    paths = [Path("triton-interpreter", cpu, Implementation.TRITON_INTERPRETER)] if INTERPRETER else []
    if has_cpu_kernel:
        paths.append(Path("cpu-extension", cpu, Implementation.EXTENSION))
    paths.append(Path("cpu-reference", cpu, Implementation.REFERENCE))
    if CUDA_AVAILABLE:
        paths.append(Path("triton-cuda", torch.device("cuda"), Implementation.TRITON))
    return paths


@contextlib.contextmanager
def on_path(path: Path, op_name: str, monkeypatch):
    """Runs the block on `path`, and checks that the dispatch agrees."""
    if path.name in ("cpu-extension", "cpu-reference"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend = "reference" if path.name == "cpu-reference" else "auto"
    with dfkd_fast.use_backend(backend):
        chosen = choose_implementation(op_name, KernelKind.TRITON, path.device, torch.float32)
        assert chosen is path.expected, (path, chosen)
        yield path


def path_fixture(op_name: str, has_cpu_kernel: bool):
    """A `path` fixture that runs each test on every path of `op_name`."""

    @pytest.fixture(params=triton_op_paths(has_cpu_kernel), ids=str)
    def path(request, monkeypatch):
        with on_path(request.param, op_name, monkeypatch) as chosen:
            yield chosen

    return path
