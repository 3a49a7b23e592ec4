"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution with padding 1 (the generator's
upsample-conv layers), computed on the input before upsampling.

Upsampling repeats each input pixel over a 2x2 block, so an output row of parity a (row 2i + a)
sees two input rows, not three, and the three kernel rows w_0, w_1, w_2 collapse into two:

    a = 0:  input rows (i - 1, i)  weighted (w_0, w_1 + w_2)
    a = 1:  input rows (i, i + 1)  weighted (w_0 + w_1, w_2)

and likewise for columns (parity b). So one convolution of the input, padded by 1, with the four
parities' 2x2 kernels stacked as 4 * out_channels output channels gives an (H + 1) x (W + 1) map
per parity; parity (a, b)'s output pixels are its window [a : a + H, b : b + W], interleaved into
the 2H x 2W output. That is 16/36 of the multiply-adds of the 3x3 convolution over the upsampled
input (plus one border row and column), and the 4x larger upsampled input is never made. Equal
to the reference up to float rounding.

The interleaving is the operator ``dfkd_fast::interleave_parities`` (autograd's own backward of
four strided slices would fill and add four zero tensors of the map's size). On the CPU the
extension's kernels do it and its backward (csrc/cpu/interleave_parities.cpp), one contiguous
row of what they write at a time, for contiguous or channels_last tensors of 2- or 4-byte
elements; PyTorch's strided copy of the same views, which runs elsewhere, takes 1.8-4.3x as long
there at the mnist preset's shapes (forward and backward). The kernels are built from the
weight, and convolved, with ordinary differentiable PyTorch ops, so autocast and autograd treat
the convolution as they treat ``nn.Conv2d``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd_fast.backend import Implementation, KernelKind, choose_implementation
from dfkd_fast.ops._checks import check_layer_tensors

__all__ = [
    "upsample_conv2d",
    "upsample_conv2d_reference",
    "parity_kernels",
    "interleave_by_copy",
    "deinterleave_by_copy",
]

OP_NAME = "upsample_conv2d"
INTERLEAVE_KERNEL_OP_NAME = "interleave_parities_kernel"
KERNEL_SIZE = 3


def upsample_conv2d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``."""
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)


def _collapse_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The three taps along `dim` -> parity 0's two taps, then parity 1's (see the module doc)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack((w0, w1 + w2, w0 + w1, w2), dim)


def parity_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(O, C, 3, 3) -> (4 O, C, 2, 2): the 2x2 kernels of the four parities, output channels
    ordered (row parity a, column parity b, o)."""
    out_channels, in_channels = weight.shape[:2]
    taps = _collapse_taps(_collapse_taps(weight, -2), -1)  # (O, C, a i, b j)
    taps = taps.view(out_channels, in_channels, 2, 2, 2, 2).permute(2, 4, 0, 1, 3, 5)
    return taps.reshape(4 * out_channels, in_channels, 2, 2)  # (a b o, C, i, j)


def tensor_memory_format(tensor: torch.Tensor) -> torch.memory_format:
    """channels_last for a tensor laid out so (and not also contiguous), else contiguous."""
    if tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _by_parity(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The maps (N, 4 O, height + 1, width + 1) viewed as the output (N, O, height, 2, width, 2):
    element (n, o, i, a, j, b) is maps[n, (2a + b) O + o, i + a, j + b], so one copy between this
    view and the output's does the whole interleaving, in any memory format."""
    n, out_channels = maps.shape[0], maps.shape[1] // 4
    batch, channel, row, column = maps.stride()
    return maps.as_strided(
        (n, out_channels, height, 2, width, 2),
        (batch, channel, row, 2 * out_channels * channel + row, column,
         out_channels * channel + column),
    )  # fmt: skip


def _pixels_by_parity(images: torch.Tensor) -> torch.Tensor:
    """(N, O, 2H, 2W) viewed as (N, O, H, 2, W, 2)."""
    return images.unflatten(2, (images.shape[2] // 2, 2)).unflatten(4, (images.shape[3] // 2, 2))


def _check_maps(maps: torch.Tensor) -> None:
    if maps.dim() != 4 or maps.shape[1] % 4 or maps.shape[2] < 2 or maps.shape[3] < 2:
        raise ValueError(
            "maps must have shape (N, 4 * out_channels, H + 1, W + 1) with H, W >= 1, got "
            f"{tuple(maps.shape)}"
        )


def _empty_interleaved(maps: torch.Tensor) -> torch.Tensor:
    n, channels, rows, columns = maps.shape
    return torch.empty((n, channels // 4, 2 * (rows - 1), 2 * (columns - 1)), dtype=maps.dtype,
                       device=maps.device, memory_format=tensor_memory_format(maps))  # fmt: skip


def _empty_parity_maps(grad_output: torch.Tensor) -> torch.Tensor:
    n, channels, height, width = grad_output.shape
    return torch.empty(
        (n, 4 * channels, height // 2 + 1, width // 2 + 1), dtype=grad_output.dtype,
        device=grad_output.device, memory_format=tensor_memory_format(grad_output),
    )  # fmt: skip


def _interleave_kernel_serves(tensor: torch.Tensor) -> bool:
    """Whether the extension's CPU kernels interleave (or de-interleave) this tensor."""
    return (
        tensor.device.type == "cpu"
        and (tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last))
        and choose_implementation(
            INTERLEAVE_KERNEL_OP_NAME, KernelKind.EXTENSION, tensor.device, tensor.dtype
        )
        is Implementation.EXTENSION
    )


def interleave_by_copy(maps: torch.Tensor) -> torch.Tensor:
    """What ``dfkd_fast::interleave_parities`` computes, by PyTorch's strided copy: (N, 4 O,
    H + 1, W + 1) parity maps -> (N, O, 2H, 2W), in the maps' memory format, with
    output[n, o, 2i + a, 2j + b] = maps[n, (2a + b) O + o, i + a, j + b]."""
    output = _empty_interleaved(maps)
    height, width = output.shape[2] // 2, output.shape[3] // 2
    _pixels_by_parity(output).copy_(_by_parity(maps, height, width))
    return output


def deinterleave_by_copy(grad_output: torch.Tensor) -> torch.Tensor:
    """What ``dfkd_fast::interleave_parities_backward`` computes, by PyTorch's strided copy."""
    grad_maps = _empty_parity_maps(grad_output)
    height, width = grad_output.shape[2] // 2, grad_output.shape[3] // 2
    _by_parity(grad_maps, height, width).copy_(_pixels_by_parity(grad_output))
    maps_of_parity = grad_maps.unflatten(1, (2, 2, grad_maps.shape[1] // 4))
    for a in (0, 1):
        for b in (0, 1):
            unread_row, unread_column = (height if a == 0 else 0), (width if b == 0 else 0)
            maps_of_parity[:, a, b, :, unread_row, :].zero_()
            maps_of_parity[:, a, b, :, :, unread_column].zero_()
    return grad_maps


@torch.library.custom_op("dfkd_fast::interleave_parities", mutates_args=())
def _interleave_parities(maps: torch.Tensor) -> torch.Tensor:
    """(N, 4 O, H + 1, W + 1) parity maps -> (N, O, 2H, 2W), in the maps' memory format:
    output[n, o, 2i + a, 2j + b] = maps[n, (2a + b) O + o, i + a, j + b]."""
    _check_maps(maps)
    if _interleave_kernel_serves(maps):
        return torch.ops.dfkd_fast.interleave_parities_kernel(maps)
    return interleave_by_copy(maps)


@torch.library.custom_op("dfkd_fast::interleave_parities_backward", mutates_args=())
def _interleave_parities_backward(grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient of the parity maps: each parity's window gets its pixels of grad_output; the
    one row and column of each map that no output pixel reads get zeros."""
    if grad_output.dim() != 4 or grad_output.shape[2] % 2 or grad_output.shape[3] % 2:
        raise ValueError(
            f"grad_output must have shape (N, O, 2H, 2W), got {tuple(grad_output.shape)}"
        )
    if _interleave_kernel_serves(grad_output):
        return torch.ops.dfkd_fast.interleave_parities_backward_kernel(grad_output)
    return deinterleave_by_copy(grad_output)


@_interleave_parities.register_fake
def _interleave_parities_fake(maps):
    _check_maps(maps)
    return _empty_interleaved(maps)


@_interleave_parities_backward.register_fake
def _interleave_parities_backward_fake(grad_output):
    return _empty_parity_maps(grad_output)


def _nothing_to_save(ctx, inputs, output) -> None:
    pass


def _interleave_backward(ctx, grad_output):
    return torch.ops.dfkd_fast.interleave_parities_backward(grad_output)


def _interleave_backward_backward(ctx, grad_grad_maps):
    return torch.ops.dfkd_fast.interleave_parities(grad_grad_maps)


torch.library.register_autograd(
    "dfkd_fast::interleave_parities", _interleave_backward, setup_context=_nothing_to_save
)
torch.library.register_autograd(
    "dfkd_fast::interleave_parities_backward",
    _interleave_backward_backward,
    setup_context=_nothing_to_save,
)


def upsample_conv2d_subpixel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference's result computed on x itself, as the module doc describes."""
    kernels = parity_kernels(weight).contiguous(memory_format=tensor_memory_format(x))
    maps = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)
    return torch.ops.dfkd_fast.interleave_parities(maps)  # (N, O, 2H, 2W)


def _check_inputs(x, weight, bias) -> None:
    check_layer_tensors(x, weight, bias)
    if x.dim() != 4 or 0 in x.shape:
        raise ValueError(f"x must have a non-empty shape (N, C, H, W), got {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1:] != (x.shape[1], KERNEL_SIZE, KERNEL_SIZE):
        raise ValueError(
            f"weight must have shape (out_channels, {x.shape[1]}, {KERNEL_SIZE}, {KERNEL_SIZE}) "
            f"for x of {x.shape[1]} channels, got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one output channel")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"bias must have one value per output channel ({weight.shape[0]}), got shape "
            f"{tuple(bias.shape)}"
        )


def upsample_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Nearest 2x upsampling, then a 3x3 convolution with padding 1:
    ``conv2d(interpolate(x, scale_factor=2), weight, bias, padding=1)``, without making the
    upsampled input and with 16/36 of its multiply-adds (see the module doc).

    Args:
        x: (N, C, H, W), any memory format (the output has x's).
        weight: (O, C, 3, 3). bias: (O,) or None.

    Returns:
        (N, O, 2H, 2W). Differentiable with respect to all three; under autocast the convolution
        runs in the autocast dtype, as ``conv2d`` does. The reference backend runs the two PyTorch
        calls above.
    """
    _check_inputs(x, weight, bias)
    implementation = choose_implementation(OP_NAME, KernelKind.COMPOSITE, x.device, x.dtype)
    if implementation is Implementation.REFERENCE:
        return upsample_conv2d_reference(x, weight, bias)
    return upsample_conv2d_subpixel(x, weight, bias)
