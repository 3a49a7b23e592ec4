"""Loads the compiled extension ``dfkd_fast._C`` once, at import, without touching CUDA.

Loading the library registers the operators under ``torch.ops.dfkd_fast``. When it is missing or
was built for another torch, the package still imports and every op falls back to its pure-PyTorch
reference; ``extension_status()`` says why.
"""

from __future__ import annotations

import functools
import importlib

import torch

REBUILD_HINT = (
    "reinstall dfkd-fast against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps ."
)


def _load() -> ImportError | OSError | None:
    try:
        importlib.import_module("dfkd_fast._C")
    except (ImportError, OSError) as error:
        return error
    return None


_LOAD_ERROR = _load()


def extension_loaded() -> bool:
    return _LOAD_ERROR is None


def extension_status() -> str:
    if _LOAD_ERROR is None:
        return "dfkd_fast._C loaded"
    return f"dfkd_fast._C could not be loaded ({_LOAD_ERROR}); {REBUILD_HINT}"


def cpu_kernel_target() -> str | None:
    """The instruction-set level (x86-64-v4, x86-64-v3, x86-64) of the C++ CPU kernels picked on
    this CPU; their results can differ between levels in the last bit. None without the extension
    (or from a build that predates the question)."""
    if _LOAD_ERROR is not None:
        return None
    module = importlib.import_module("dfkd_fast._C")
    return module.cpu_kernel_target() if hasattr(module, "cpu_kernel_target") else None


@functools.lru_cache(maxsize=None)
def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether the extension registered a kernel of ``dfkd_fast::<op_name>`` for this device
    (fixed once the library is loaded, so the answer is cached)."""
    if _LOAD_ERROR is not None:
        return False
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None or not hasattr(torch.ops.dfkd_fast, op_name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dfkd_fast::{op_name}", dispatch_key)
