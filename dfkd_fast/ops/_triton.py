"""How the Triton-backed operators reach their kernels: lazily, and only where they can run."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from dfkd_fast.backend import TRITON_INTERPRET_ENV_VAR


def kernel_module(name: str, op_name: str) -> ModuleType:
    """Imports dfkd_fast.ops.<name> (which imports Triton) on the first kernel launch."""
    try:
        return importlib.import_module(f"dfkd_fast.ops.{name}")
    except ImportError as error:
        raise RuntimeError(f"dfkd_fast.{op_name} needs Triton for this device: {error}") from None


def check_device(tensor: torch.Tensor, op_name: str) -> None:
    """Triton kernels take CUDA tensors, or CPU tensors under the interpreter."""
    if tensor.device.type == "cpu" and os.environ.get(TRITON_INTERPRET_ENV_VAR) != "1":
        raise RuntimeError(
            f"the Triton {op_name} kernels run on CPU tensors only under TRITON_INTERPRET=1; "
            f"dfkd_fast.{op_name} runs its CPU implementation otherwise"
        )
