"""Keeping freed host memory for reuse, so that a CPU training loop stops paying page faults.

PyTorch allocates CPU tensors with the C library's malloc. With glibc's defaults, a block above
the mmap threshold (128 KiB at first, raised as blocks are freed) is mapped afresh on every
allocation and unmapped when freed, and free memory at the top of the heap goes back to the
system: every step of a distillation run then touches megabytes of new pages, which the kernel
faults in and zeroes (about 10,000 faults and 20 ms of system time per MNIST pre-dfkd step).
Raising both thresholds keeps those blocks in the heap for the next step, as jemalloc or
tcmalloc would.

This changes the whole process, so the library never calls it on its own: the CLI calls it at
start-up; programs that call :func:`dfkd_fast.distill` on the CPU may call it once, first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def has_glibc_malloc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_host_memory(mmap_threshold: int = MMAP_THRESHOLD,
                             trim_threshold: int = TRIM_THRESHOLD) -> bool:  # fmt: skip
    """Makes glibc's malloc serve blocks of up to `mmap_threshold` bytes from its heap and keep
    up to `trim_threshold` bytes of free heap instead of returning them to the system. Returns
    whether it did: False where the C library is not glibc (musl, macOS, Windows)."""
    limits = (("mmap_threshold", mmap_threshold, MMAP_THRESHOLD),
              ("trim_threshold", trim_threshold, 2**31 - 1))  # fmt: skip
    for name, value, largest in limits:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if not 0 <= value <= largest:
            raise ValueError(f"{name} must be in [0, {largest}], got {value}")
    if not has_glibc_malloc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    return libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
