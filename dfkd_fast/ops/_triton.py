"""How the Triton-backed operators reach their kernels: lazily, and only where they can run."""

from __future__ import annotations

import importlib
import os
import re
from types import ModuleType

import torch

from dfkd_fast.backend import TRITON_INTERPRET_ENV_VAR


def _release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None.

    The interpreters of Triton 3.0 and 3.1 were compiled against NumPy 1: under NumPy 2 their
    stores write nothing, without an error, so every kernel would return uninitialised memory.
    """
    if _release(triton_version) < (3, 2) and _release(numpy_version) >= (2, 0):
        return (
            f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) writes no results under "
            f"NumPy {numpy_version}: install numpy<2 or triton>=3.2"
        )
    return None


def kernel_module(name: str, op_name: str) -> ModuleType:
    """Imports dfkd_fast.ops.<name> (which imports Triton) on the first kernel launch."""
    try:
        module = importlib.import_module(f"dfkd_fast.ops.{name}")
    except ImportError as error:
        raise RuntimeError(f"dfkd_fast.{op_name} needs Triton for this device: {error}") from None
    if os.environ.get(TRITON_INTERPRET_ENV_VAR) == "1":
        import numpy
        import triton

        problem = interpreter_problem(triton.__version__, numpy.__version__)
        if problem is not None:
            raise RuntimeError(f"dfkd_fast.{op_name}: {problem}")
    return module


def check_device(tensor: torch.Tensor, op_name: str) -> None:
    """Triton kernels take CUDA tensors, or CPU tensors under the interpreter."""
    if tensor.device.type == "cpu" and os.environ.get(TRITON_INTERPRET_ENV_VAR) != "1":
        raise RuntimeError(
            f"the Triton {op_name} kernels run on CPU tensors only under TRITON_INTERPRET=1; "
            f"dfkd_fast.{op_name} runs its CPU implementation otherwise"
        )
