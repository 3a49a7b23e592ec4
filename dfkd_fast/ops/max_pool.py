"""2x2 max-pooling with stride 2 (LeNet-5's pooling), with the position of each maximum.

PyTorch's CPU pooling with indices vectorises over channels in channels_last, which does little
for LeNet-5's 3 to 16 channels. The extension's kernel ``dfkd_fast::max_pool2x2``
(csrc/cpu/max_pool.cpp) copies each block of windows' four corners into four arrays, so that the
maxima and their positions in the window (one byte) are computed on contiguous vectors, with
compares and bit selects and no branch on the data; its backward writes each output's gradient at
its maximum and zeroes the rest. It picks what ``max_pool2d`` picks (the first maximum in
row-major order, NaN winning), so outputs and gradients are equal bit for bit. It serves float32
and bfloat16 CPU tensors in channels_last, of any channel count (bfloat16 compared as the float32
values they widen to). Other CPU tensors that need no gradient (a contiguous layout) take the
elementwise maximum of the four strided 2x2 phases, the same values, faster than the CPU pooling
kernel on few channels (`benchmarks/bench_layers.py`); everything else runs ``F.max_pool2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd_fast import _extension
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation
from dfkd_fast.ops._checks import check_floating_tensor

__all__ = ["max_of_phases", "max_pool2x2", "max_pool2x2_reference"]

OP_NAME = "max_pool2x2"
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def max_pool2x2_reference(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``."""
    return F.max_pool2d(x, 2)


def max_of_phases(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` as the elementwise maximum of the four strided 2x2 phases of `x`."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor, as max_pool2d
    rows_even, rows_odd = x[..., 0:height:2, :width], x[..., 1:height:2, :width]
    return torch.maximum(
        torch.maximum(rows_even[..., 0::2], rows_even[..., 1::2]),
        torch.maximum(rows_odd[..., 0::2], rows_odd[..., 1::2]),
    )


def _pooled_shape(x: torch.Tensor) -> tuple[int, int, int, int]:
    n, channels, height, width = x.shape
    return n, channels, height // 2, width // 2


def _windows(tensor: torch.Tensor, pooled_shape) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, Ho, Wo, 4): each output's window, row-major (a last odd row or
    column, in no window, dropped)."""
    n, channels, height, width = pooled_shape
    cropped = tensor[:, :, : 2 * height, : 2 * width]
    by_window = cropped.unflatten(2, (height, 2)).unflatten(4, (width, 2))
    return by_window.permute(0, 1, 2, 4, 3, 5).reshape(n, channels, height, width, 4)


if _extension.extension_loaded():

    @torch.library.register_fake("dfkd_fast::max_pool2x2")
    def _max_pool2x2_fake(x):
        shape = _pooled_shape(x)
        output = x.new_empty(shape).contiguous(memory_format=torch.channels_last)
        return output, torch.empty_like(output, dtype=torch.uint8)

    @torch.library.register_fake("dfkd_fast::max_pool2x2_backward")
    def _max_pool2x2_backward_fake(grad_output, indices, input_size):
        return grad_output.new_empty(input_size).contiguous(memory_format=torch.channels_last)

    def _save_for_second_derivative(ctx, inputs, output):
        _, indices, _ = inputs
        ctx.save_for_backward(indices)

    def _unpool_backward(ctx, grad_grad_x):
        """The gradient of grad_output: each output's window of grad_grad_x at its maximum."""
        (indices,) = ctx.saved_tensors
        windows = _windows(grad_grad_x, indices.shape)
        return windows.gather(-1, indices.long().unsqueeze(-1)).squeeze(-1), None, None

    # dfkd_fast::max_pool2x2 has its autograd in C++ (csrc/max_pool_autograd.cpp), which costs
    # less per call; its backward's, needed for second derivatives only, is this one.
    torch.library.register_autograd(
        "dfkd_fast::max_pool2x2_backward",
        _unpool_backward,
        setup_context=_save_for_second_derivative,
    )


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``: 2x2 windows, stride 2, a last odd row or column dropped; on the CPU
    by the extension's kernel (float32, bfloat16) or the phase maximum (see the module doc),
    equal bit for bit.

    Args:
        x: (N, C, H, W) with H, W >= 2.

    Returns:
        (N, C, H // 2, W // 2), differentiable (twice).
    """
    check_floating_tensor("x", x)
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must have shape (N, C, H, W) with H, W >= 2, got {tuple(x.shape)}")
    if x.device.type != "cpu":
        return max_pool2x2_reference(x)
    if (
        x.dtype in KERNEL_DTYPES
        and x.is_contiguous(memory_format=torch.channels_last)
        and choose_implementation(OP_NAME, KernelKind.EXTENSION, x.device, x.dtype)
        is Implementation.EXTENSION
    ):
        return torch.ops.dfkd_fast.max_pool2x2(x)[0]
    if not (torch.is_grad_enabled() and x.requires_grad) and (
        choose_implementation(OP_NAME, KernelKind.COMPOSITE, x.device, x.dtype)
        is Implementation.COMPOSITE
    ):
        return max_of_phases(x)
    return max_pool2x2_reference(x)
