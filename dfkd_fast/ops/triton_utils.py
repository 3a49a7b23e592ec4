"""Triton helpers shared by the kernel modules (imported only with them, never by dfkd_fast)."""

import triton
import triton.language as tl


@triton.jit
def store_rounded(pointer, value, mask):
    """Stores float32 `value` in the pointer's dtype, rounding to nearest even.

    float32 -> bfloat16 rounds on the bits (the interpreter would truncate, GPUs round): the
    rounded value's low 16 bits are cleared, so the conversion that follows is exact everywhere;
    leaving them set would round twice on a GPU.
    """
    if pointer.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    tl.store(pointer, value.to(pointer.dtype.element_ty), mask=mask)
