"""A stride-1 convolution for layers with few output or few input channels: an image generator's
last layer (to 1 or 3 channels) and a classifier's first layer (from 1 or 3).

oneDNN, which runs PyTorch's CPU convolutions, computes output channels in blocks of 8 or 16, so
a convolution to one channel costs what eight would; the gradient with respect to the input of a
layer with one input channel is such a convolution too. On the CPU, in float32 and channels_last,
the extension's kernel ``dfkd_fast::narrow_conv2d`` computes these as dot products over the
contiguous channels of each kernel row (csrc/cpu/narrow_conv.cpp), about 3x faster than oneDNN
for one channel and no slower up to three (benchmarks/bench_few_channel_conv.py). A convolution
of a one-channel input (a LeNet's first layer on grey images) has kernel rows too short for dot
products; the kernel computes it as rows of output pixels, each tap's weight times the input
under them, about twice as fast as oneDNN for LeNet-5's 3 or 6. So:

* forward: the kernel when there are at most ``NARROW_CHANNELS`` output channels, or one input
  channel and at most ``ONE_CHANNEL_MAX_OUTPUTS``;
* gradient of the input: for zero padding p <= K - 1 it is the convolution of the output's
  gradient with the kernel flipped and its channel axes swapped, padded by K - 1 - p, so the
  kernel when there are at most ``NARROW_CHANNELS`` input channels, or one output channel and
  at most ``ONE_CHANNEL_MAX_OUTPUTS`` input channels;
* gradient of the weight and bias, and every other case: PyTorch's convolution.

Elsewhere (another device or dtype, autocast, a contiguous multi-channel input, the reference
backend) it is ``F.conv2d``. Equal to it up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd_fast import _extension
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation
from dfkd_fast.ops._checks import autocast_enabled, check_layer_tensors

__all__ = ["few_channel_conv2d", "few_channel_conv2d_reference", "NARROW_CHANNELS"]

KERNEL_OP_NAME = "narrow_conv2d"
NARROW_CHANNELS = 3  # at most this many output channels, the kernel beats oneDNN
MIN_KERNEL_ROW = 8  # input values a kernel row meets (KW * C): below this, few dot products
# one input channel: up to this many output channels the kernel beats oneDNN in a step (the input
# gradient of a generator's 16-to-1 last layer, a 1-to-16 convolution, does not gain)
ONE_CHANNEL_MAX_OUTPUTS = 8


def few_channel_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)``."""
    return F.conv2d(x, weight, bias, padding=padding)


def _pair(padding) -> tuple[int, int]:
    if isinstance(padding, bool) or not isinstance(padding, (int, tuple, list)):
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    pair = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(pair) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pair):
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    if min(pair) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return pair


def _one_input_channel(weight: torch.Tensor) -> bool:
    return weight.shape[1] == 1 and weight.shape[0] <= ONE_CHANNEL_MAX_OUTPUTS


def _kernel_gains(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the narrow kernel can convolve x with weight, and gains: float32 CPU tensors, and
    either at most NARROW_CHANNELS output channels with kernel rows of at least MIN_KERNEL_ROW
    values, or one input channel and at most ONE_CHANNEL_MAX_OUTPUTS output channels. The kernel
    reads x in channels_last."""
    out_channels, in_channels, _, kernel_width = weight.shape
    narrow = out_channels <= NARROW_CHANNELS and in_channels * kernel_width >= MIN_KERNEL_ROW
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (narrow or _one_input_channel(weight))
        and _extension.has_kernel(KERNEL_OP_NAME, "cpu")
    )


def _flipped_transposed(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, KH, KW) -> (C, O, KH, KW) flipped in both spatial axes: the kernel whose convolution
    of the output's gradient is the input's gradient."""
    return weight.transpose(0, 1).flip(-2, -1)


def _input_gradient_padding(weight: torch.Tensor, padding) -> tuple[int, int] | None:
    rows, columns = weight.shape[-2] - 1 - padding[0], weight.shape[-1] - 1 - padding[1]
    return (rows, columns) if min(rows, columns) >= 0 else None


def _channels_last_strided(tensor: torch.Tensor) -> bool:
    """Strided exactly as channels_last, even where a size-1 axis makes the layouts coincide."""
    _, channels, _, width = tensor.shape
    return tensor.stride(1) == 1 and tensor.stride(3) == channels and (
        tensor.stride(2) == width * channels
    )


def _output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """channels_last if x or the weight is strided so, as PyTorch's CPU convolution decides."""
    if _channels_last_strided(x) or _channels_last_strided(weight):
        return torch.channels_last
    return torch.contiguous_format


def _narrow_output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout of the narrow kernel's output: channels_last, except for a one-channel input,
    where it is conv2d's."""
    return _output_memory_format(x, weight) if x.shape[1] == 1 else torch.channels_last


def _convolve(x, weight, bias, padding) -> torch.Tensor:
    if _kernel_gains(x, weight) and x.is_contiguous(memory_format=torch.channels_last):
        output = torch.ops.dfkd_fast.narrow_conv2d(x, weight, bias, padding)
    else:
        output = F.conv2d(x, weight, bias, padding=padding)
    memory_format = _output_memory_format(x, weight)
    if output.is_contiguous(memory_format=memory_format) and (
        _channels_last_strided(output) == (memory_format is torch.channels_last)
    ):
        return output
    return torch.empty_like(output, memory_format=memory_format).copy_(output)


def _empty_output(x, weight, padding, memory_format=None) -> torch.Tensor:
    n, _, height, width = x.shape
    out_channels, _, kernel_height, kernel_width = weight.shape
    shape = (n, out_channels, height + 2 * padding[0] - kernel_height + 1,
             width + 2 * padding[1] - kernel_width + 1)  # fmt: skip
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=memory_format or _output_memory_format(x, weight))  # fmt: skip


if _extension.extension_loaded():

    @torch.library.register_fake("dfkd_fast::narrow_conv2d")
    def _narrow_conv2d_fake(x, weight, bias, padding):
        return _empty_output(x, weight, padding, _narrow_output_memory_format(x, weight))


@torch.library.custom_op("dfkd_fast::few_channel_conv2d", mutates_args=())
def _few_channel_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int]
) -> torch.Tensor:
    """conv2d(x, weight, bias, padding), stride 1, output in x's memory format; the narrow
    kernel computes it where it serves, PyTorch's convolution elsewhere."""
    return _convolve(x, weight, bias, tuple(padding))


@_few_channel_conv2d.register_fake
def _few_channel_conv2d_fake(x, weight, bias, padding):
    return _empty_output(x, weight, padding)


def _save_for_backward(ctx, inputs, output) -> None:
    x, weight, bias, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding = tuple(padding)
    ctx.has_bias = bias is not None


def _narrow_input_gradient(grad_output, weight, padding) -> torch.Tensor | None:
    """The input's gradient by the narrow kernel, or None where it does not gain. The kernel
    reads the output's gradient in channels_last, converted if need be (a copy of O channels
    costs less than oneDNN's convolution to few channels)."""
    transposed_padding = _input_gradient_padding(weight, padding)
    flipped = _flipped_transposed(weight)
    if transposed_padding is None or not _kernel_gains(grad_output, flipped):
        return None
    grad_output = grad_output.contiguous(memory_format=torch.channels_last)
    return torch.ops.dfkd_fast.few_channel_conv2d(grad_output, flipped, None,
                                                  list(transposed_padding))  # fmt: skip


def _backward(ctx, grad_output):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    grad_x = _narrow_input_gradient(grad_output, weight, ctx.padding) if need_x else None
    grad_weight = grad_bias = None
    need_x = need_x and grad_x is None
    if need_x or need_weight or need_bias:
        pytorch_grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, x, weight, [weight.shape[0]] if need_bias else None, [1, 1],
            list(ctx.padding), [1, 1], False, [0, 0], 1, [need_x, need_weight, need_bias],
        )  # fmt: skip
        if need_x:
            grad_x = pytorch_grad_x
    return grad_x, grad_weight, grad_bias, None


torch.library.register_autograd(
    "dfkd_fast::few_channel_conv2d", _backward, setup_context=_save_for_backward
)


def _check_inputs(x, weight, bias) -> None:
    check_layer_tensors(x, weight, bias)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or 0 in weight.shape:
        raise ValueError(
            f"weight must have a non-empty shape (out_channels, {x.shape[1]}, KH, KW) for x of "
            f"{x.shape[1]} channels, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"bias must have one value per output channel ({weight.shape[0]}), got shape "
            f"{tuple(bias.shape)}"
        )


def few_channel_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1, zero padding), faster on the CPU
    when the layer has at most NARROW_CHANNELS output or input channels (see the module doc).

    Args:
        x: (N, C, H, W). weight: (O, C, KH, KW). bias: (O,) or None. padding: an int or a pair.

    Returns:
        (N, O, H + 2 ph - KH + 1, W + 2 pw - KW + 1). Differentiable with respect to all three.
    """
    _check_inputs(x, weight, bias)
    padding = _pair(padding)
    for axis, (size, kernel) in enumerate(zip(x.shape[2:], weight.shape[2:])):
        if size + 2 * padding[axis] < kernel:
            raise ValueError(
                f"x's padded size {tuple(s + 2 * p for s, p in zip(x.shape[2:], padding))} is "
                f"smaller than the kernel {tuple(weight.shape[2:])}"
            )
    gradient_of_x = x.requires_grad and torch.is_grad_enabled()
    narrow = (
        weight.shape[0] <= NARROW_CHANNELS
        or _one_input_channel(weight)
        or (gradient_of_x and weight.shape[1] <= NARROW_CHANNELS)
    )
    if (
        not narrow
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or autocast_enabled("cpu")  # which casts as it casts conv2d
        or choose_implementation(KERNEL_OP_NAME, KernelKind.EXTENSION, x.device, x.dtype)
        is not Implementation.EXTENSION
    ):
        return few_channel_conv2d_reference(x, weight, bias, padding)
    return torch.ops.dfkd_fast.few_channel_conv2d(x, weight, bias, list(padding))
