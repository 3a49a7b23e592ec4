"""Which implementation an op runs: decided here, and only here.

* CUDA tensors run the kernels (the compiled extension's CUDA kernels, or Triton kernels).
* CPU tensors run the extension's C++ kernels; ops whose GPU kernels are written in Triton run
  the Triton kernel under the interpreter when ``TRITON_INTERPRET=1``, else their C++ CPU kernel
  (the extension op of the same name) if there is one, else their pure-PyTorch reference.
* Dtypes a kernel does not support (float64, say) run the reference.
* Composite ops (a faster formulation written in PyTorch ops, such as upsample_conv2d's) run it
  on every device and dtype.
* ``DFKD_FAST_BACKEND=reference`` or ``with dfkd_fast.use_backend("reference"):`` forces the
  reference everywhere.

Under ``torch.compile`` the choice is made once, when the function is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import os
import warnings
from typing import Iterator

import torch

from dfkd_fast import _extension

BACKEND_ENV_VAR = "DFKD_FAST_BACKEND"
TRITON_INTERPRET_ENV_VAR = "TRITON_INTERPRET"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Backend(str, enum.Enum):
    """What the user asks for."""

    AUTO = "auto"
    REFERENCE = "reference"


class Implementation(str, enum.Enum):
    """What an op call runs."""

    EXTENSION = "extension"  # dfkd_fast._C: C++ on CPU, CUDA on GPU
    TRITON = "triton"  # a Triton kernel on a GPU
    TRITON_INTERPRETER = "triton-interpreter"  # a Triton kernel run by the interpreter on CPU
    COMPOSITE = "composite"  # the op's own formulation in PyTorch ops, on any device
    REFERENCE = "reference"  # the pure-PyTorch reference


class KernelKind(str, enum.Enum):
    """How an op's kernels are written."""

    EXTENSION = "extension"
    TRITON = "triton"
    COMPOSITE = "composite"  # faster PyTorch ops than the reference's, on every device and dtype


_backend_override: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "dfkd_fast_backend_override", default=None
)


def parse_backend(value: str | Backend, source: str = "backend") -> Backend:
    try:
        return Backend(value)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"{source} must be one of {choices}, got {value!r}") from None


@contextlib.contextmanager
def use_backend(backend: str | Backend) -> Iterator[None]:
    """Run the ops in this block with ``backend`` ("auto" or "reference")."""
    token = _backend_override.set(parse_backend(backend))
    try:
        yield
    finally:
        _backend_override.reset(token)


def requested_backend() -> Backend:
    """The context manager's choice, else the environment variable's, else AUTO."""
    override = _backend_override.get()
    if override is not None:
        return override
    value = os.environ.get(BACKEND_ENV_VAR)
    return Backend.AUTO if value is None else parse_backend(value, BACKEND_ENV_VAR)


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo.

    The public decorator imports torch._dynamo (and Triton with it, ~1.4 s) only to set this
    marker; importing dfkd_fast must stay cheap. tests/test_reparameterize.py compiles a call
    with fullgraph=True, which fails if the marker stops working.
    """
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _choose(op_name: str, kind: str, device_type: str, dtype: torch.dtype) -> str:
    if requested_backend() is Backend.REFERENCE:
        return Implementation.REFERENCE.value
    if kind == KernelKind.COMPOSITE.value:
        return Implementation.COMPOSITE.value
    if dtype not in KERNEL_DTYPES:
        return Implementation.REFERENCE.value
    if kind == KernelKind.EXTENSION.value:
        if _extension.has_kernel(op_name, device_type):
            return Implementation.EXTENSION.value
        if device_type in ("cpu", "cuda"):
            warnings.warn(
                f"dfkd_fast.{op_name}: no compiled {device_type} kernel, running the reference "
                f"({_extension.extension_status()})",
                RuntimeWarning,
                stacklevel=4,
            )
        return Implementation.REFERENCE.value
    if device_type == "cuda":
        return Implementation.TRITON.value
    if os.environ.get(TRITON_INTERPRET_ENV_VAR) == "1":
        return Implementation.TRITON_INTERPRETER.value
    if _extension.has_kernel(op_name, device_type):
        return Implementation.EXTENSION.value
    return Implementation.REFERENCE.value


def choose_implementation(
    op_name: str, kind: KernelKind, device: torch.device, dtype: torch.dtype
) -> Implementation:
    """The implementation that ``op_name`` runs for tensors of this device and dtype."""
    return Implementation(_choose(op_name, KernelKind(kind).value, device.type, dtype))


BFLOAT16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512 / AMX, Arm


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (or the text given): x86's "flags", Arm's
    "Features"; empty where there are none to read (not Linux)."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_bfloat16_instructions(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bfloat16 natively, from the flags of /proc/cpuinfo (or the text
    given); None where there are no flags to read (not Linux)."""
    flags = cpu_flags(cpuinfo)
    return bool(flags & BFLOAT16_CPU_FLAGS) if flags else None
