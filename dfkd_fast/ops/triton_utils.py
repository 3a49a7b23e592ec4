"""Triton helpers shared by the kernel modules (imported only with them, never by dfkd_fast)."""

import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(value):
    """float32 `value` rounded to the nearest bfloat16 (ties to even), still as float32.

    Done on the bits because a float32 -> bfloat16 cast truncates in the interpreter and rounds on
    GPUs: the low 16 bits come out cleared, so the cast that follows is exact everywhere; left set,
    they would make a GPU round a second time. NaN passes through.
    """
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(value != value, value, bits.to(tl.float32, bitcast=True))


@triton.jit
def store_rounded(pointer, value, mask):
    """Stores float32 `value` in the pointer's dtype, rounding to nearest even."""
    if pointer.dtype.element_ty == tl.bfloat16:
        value = round_to_bfloat16(value)
    tl.store(pointer, value.to(pointer.dtype.element_ty), mask=mask)
