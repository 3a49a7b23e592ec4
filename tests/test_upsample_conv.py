"""dfkd_fast.upsample_conv2d (2x2 kernels on the input before upsampling) against interpolate +
conv2d in float64, gradients included, and the layers built on it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dfkd_fast
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation
from dfkd_fast.models import VAE, Generator
from dfkd_fast.models.layers import separate_upsampling
from dfkd_fast.nn import UpsampleConv2d
from dfkd_fast import _extension
from dfkd_fast.ops.upsample_conv import (
    deinterleave_by_copy,
    interleave_by_copy,
    tensor_memory_format,
    upsample_conv2d,
    upsample_conv2d_reference,
    upsample_conv2d_subpixel,
)

from .gradients import output_and_gradients
from .profiling import op_calls
from .tolerances import assert_as_accurate_as_pytorch

# (N, C, H, W, out_channels): odd and non-square sizes, 1 x 1 inputs, one channel in or out
SHAPES = [(3, 5, 7, 6, 4), (2, 1, 1, 1, 1), (2, 16, 8, 8, 1), (1, 64, 5, 9, 32), (4, 3, 16, 16, 16)]


def make_inputs(shape, dtype, channels_last, seed=0):
    n, channels, height, width, out_channels = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, height, width, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, channels, 3, 3, generator=g) / (3 * channels**0.5)
    weight = weight.to(dtype)
    bias = torch.randn(out_channels, generator=g).to(dtype)
    grad_output = torch.randn(n, out_channels, 2 * height, 2 * width, generator=g).to(dtype)
    return x, weight, bias, grad_output


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_output_and_gradients_match_float64(shape, dtype, channels_last, with_bias):
    x, weight, bias, grad_output = make_inputs(shape, dtype, channels_last)
    bias = bias if with_bias else None
    actual = output_and_gradients(upsample_conv2d, x, weight, bias, grad_output=grad_output)
    pytorch = output_and_gradients(upsample_conv2d_reference, x, weight, bias,
                                   grad_output=grad_output)  # fmt: skip
    exact = output_and_gradients(
        upsample_conv2d_reference, x.double(), weight.double(),
        None if bias is None else bias.double(), grad_output=grad_output.double(),
    )  # fmt: skip
    assert actual[0].dtype == dtype and actual[0].shape == exact[0].shape
    assert actual[0].is_contiguous(memory_format=torch.channels_last) == channels_last or (
        actual[0].is_contiguous()
    )
    for mine, theirs, expected in zip(actual, pytorch, exact):
        assert_as_accurate_as_pytorch(mine, theirs, expected, dtype)


def test_the_parity_maps_are_not_upsampled_first():
    """The composite path runs one convolution of the input itself (2x2 kernels, 4x the output
    channels) and no upsampling."""
    x, weight, bias, _ = make_inputs((2, 3, 5, 4, 2), torch.float32, False)
    with torch.profiler.profile() as profile:
        upsample_conv2d(x, weight, bias)
    names = [event.name for event in profile.events()]
    assert not any("upsample" in name for name in names)
    assert "dfkd_fast::interleave_parities" in names


def test_dispatch_composite_by_default_reference_on_request():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        chosen = choose_implementation("upsample_conv2d", KernelKind.COMPOSITE, cpu, dtype)
        assert chosen is Implementation.COMPOSITE
    x, weight, bias, _ = make_inputs((2, 3, 5, 4, 2), torch.float32, False)
    with dfkd_fast.use_backend("reference"):
        assert choose_implementation(
            "upsample_conv2d", KernelKind.COMPOSITE, cpu, torch.float32
        ) is Implementation.REFERENCE  # fmt: skip
        torch.testing.assert_close(
            upsample_conv2d(x, weight, bias), upsample_conv2d_reference(x, weight, bias),
            rtol=0, atol=0,
        )  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_opcheck(channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    maps = torch.randn(2, 12, 4, 6).contiguous(memory_format=memory_format).requires_grad_()
    torch.library.opcheck(torch.ops.dfkd_fast.interleave_parities.default, (maps,))
    grad_output = torch.randn(2, 3, 6, 10).contiguous(memory_format=memory_format)
    torch.library.opcheck(
        torch.ops.dfkd_fast.interleave_parities_backward.default,
        (grad_output.requires_grad_(),),
    )  # fmt: skip


def assert_interleaves(maps: torch.Tensor) -> None:
    """interleave_parities(maps), and the strided copy it runs where no kernel serves, are each
    parity's window of the maps, in the maps' layout."""
    for interleave in (torch.ops.dfkd_fast.interleave_parities, interleave_by_copy):
        assert_interleaved(maps, interleave(maps))


def assert_interleaved(maps: torch.Tensor, output: torch.Tensor) -> None:
    out_channels, height, width = maps.shape[1] // 4, maps.shape[2] - 1, maps.shape[3] - 1
    assert output.shape == (maps.shape[0], out_channels, 2 * height, 2 * width)
    assert output.dtype == maps.dtype
    assert output.is_contiguous(memory_format=tensor_memory_format(maps))
    by_parity = maps.unflatten(1, (2, 2, out_channels))
    for a in (0, 1):
        for b in (0, 1):
            expected = by_parity[:, a, b, :, a : a + height, b : b + width]
            torch.testing.assert_close(output[:, :, a::2, b::2], expected, rtol=0, atol=0)


def assert_deinterleaves(grad_output: torch.Tensor) -> None:
    """Each parity's window of interleave_parities_backward(grad_output) (and of the strided
    copy's) is its pixels of grad_output, and the row and column no output pixel reads are zero."""
    for deinterleave in (torch.ops.dfkd_fast.interleave_parities_backward, deinterleave_by_copy):
        assert_deinterleaved(grad_output, deinterleave(grad_output))


def assert_deinterleaved(grad_output: torch.Tensor, grad_maps: torch.Tensor) -> None:
    out_channels, height, width = grad_output.shape[1], *(s // 2 for s in grad_output.shape[2:])
    assert grad_maps.shape == (grad_output.shape[0], 4 * out_channels, height + 1, width + 1)
    assert grad_maps.dtype == grad_output.dtype
    assert grad_maps.is_contiguous(memory_format=tensor_memory_format(grad_output))
    by_parity = grad_maps.unflatten(1, (2, 2, out_channels))
    for a in (0, 1):
        for b in (0, 1):
            window = by_parity[:, a, b, :, a : a + height, b : b + width]
            torch.testing.assert_close(window, grad_output[:, :, a::2, b::2], rtol=0, atol=0)
    assert by_parity[:, 0, :, :, -1].eq(0).all() and by_parity[:, 1, :, :, 0].eq(0).all()
    assert by_parity[:, :, 0, :, :, -1].eq(0).all() and by_parity[:, :, 1, :, :, 0].eq(0).all()


def random_tensor(shape, dtype, memory_format, seed):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1e3
    return values.to(dtype).contiguous(memory_format=memory_format)


# (N, O, H, W) of the output's half: the preset's layers, odd and non-square ones, 1 x 1 maps
INTERLEAVE_SHAPES = [(3, 16, 8, 8), (2, 5, 3, 7), (1, 1, 1, 1), (2, 3, 6, 1), (1, 33, 2, 5)]


@pytest.mark.parametrize("shape", INTERLEAVE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_the_interleaving_puts_each_parity_window_in_place(shape, dtype, channels_last):
    n, out_channels, height, width = shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    seed = sum(shape) + 7 * channels_last
    assert_interleaves(
        random_tensor((n, 4 * out_channels, height + 1, width + 1), dtype, memory_format, seed)
    )  # fmt: skip
    assert_deinterleaves(
        random_tensor((n, out_channels, 2 * height, 2 * width), dtype, memory_format, seed + 1)
    )  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_the_interleaving_reads_views_of_larger_tensors(channels_last):
    """Views that are neither contiguous nor channels_last take PyTorch's strided copy: a slice
    with an offset and padded strides must give what each parity's window gives."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    storage = torch.randn(3, 20, 7, 9).contiguous(memory_format=memory_format)
    maps = storage[1:, 4:16, 1:6, 2:9]  # (2, 12, 5, 7): O = 3, H = 4, W = 6
    assert not maps.is_contiguous(memory_format=memory_format)
    assert_interleaves(maps)
    grad_output = torch.randn(3, 3, 9, 13).contiguous(memory_format=memory_format)[1:, :, 1:, 1:]
    assert_deinterleaves(grad_output)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_autograd_of_the_interleaving_is_its_backward_op_and_back(channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    maps = random_tensor((2, 8, 4, 6), torch.float32, memory_format, 1).requires_grad_()
    grad_output = random_tensor((2, 2, 6, 10), torch.float32, memory_format, 2)
    (grad_maps,) = torch.autograd.grad(
        torch.ops.dfkd_fast.interleave_parities(maps), maps, grad_output
    )  # fmt: skip
    expected = torch.ops.dfkd_fast.interleave_parities_backward(grad_output)
    torch.testing.assert_close(grad_maps, expected, rtol=0, atol=0)
    grad_output.requires_grad_()
    (grad_grad,) = torch.autograd.grad(
        torch.ops.dfkd_fast.interleave_parities_backward(grad_output), grad_output, maps.detach()
    )  # fmt: skip
    torch.testing.assert_close(
        grad_grad, torch.ops.dfkd_fast.interleave_parities(maps.detach()), rtol=0, atol=0
    )  # fmt: skip


needs_interleave_kernels = pytest.mark.skipif(
    not _extension.has_kernel("interleave_parities_kernel", "cpu"),
    reason=_extension.extension_status(),
)


def interleave_kernel_calls(function) -> int:
    return sum(
        op_calls(function, f"dfkd_fast::{name}")
        for name in ("interleave_parities_kernel", "interleave_parities_backward_kernel")
    )  # fmt: skip


@needs_interleave_kernels
def test_the_extension_kernels_interleave_dense_cpu_tensors_of_2_or_4_byte_elements():
    maps = torch.randn(2, 8, 4, 5)
    grad_output = torch.randn(2, 2, 6, 8)

    def both(maps, grad_output):
        return lambda: (torch.ops.dfkd_fast.interleave_parities(maps),
                        torch.ops.dfkd_fast.interleave_parities_backward(grad_output))  # fmt: skip

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            dense = [t.to(dtype).contiguous(memory_format=memory_format)
                     for t in (maps, grad_output)]  # fmt: skip
            assert interleave_kernel_calls(both(*dense)) == 2
    assert interleave_kernel_calls(both(maps.double(), grad_output.double())) == 0
    assert interleave_kernel_calls(both(maps[:, :, :, :-1], grad_output[:, :, :, :-2])) == 0
    with dfkd_fast.use_backend("reference"):
        assert interleave_kernel_calls(both(maps, grad_output)) == 0


@needs_interleave_kernels
@pytest.mark.parametrize(
    "op,tensor,message",
    [
        ("interleave_parities_kernel", torch.randn(2, 6, 3, 3), "maps must have shape"),
        ("interleave_parities_kernel", torch.randn(2, 8, 1, 3), "maps must have shape"),
        ("interleave_parities_kernel", torch.randn(2, 8, 3, 3).double(), "2- or 4-byte"),
        ("interleave_parities_kernel", torch.randn(2, 8, 3, 5)[..., ::2], "channels_last"),
        ("interleave_parities_backward_kernel", torch.randn(2, 3, 5, 4), "grad_output must"),
        ("interleave_parities_backward_kernel", torch.randn(2, 3, 4), "grad_output must"),
    ],
)
def test_the_extension_kernels_reject_what_they_cannot_serve(op, tensor, message):
    with pytest.raises((ValueError, TypeError), match=message):
        getattr(torch.ops.dfkd_fast, op)(tensor)


def test_torch_compile_matches_eager():
    x, weight, bias, grad_output = make_inputs((2, 4, 5, 3, 3), torch.float32, True)
    compiled = torch.compile(upsample_conv2d_subpixel, fullgraph=True)
    eager = output_and_gradients(upsample_conv2d_subpixel, x, weight, bias,
                                 grad_output=grad_output)  # fmt: skip
    compiled_results = output_and_gradients(compiled, x, weight, bias, grad_output=grad_output)
    for actual, expected in zip(compiled_results, eager):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_autocast_runs_the_convolution_in_bfloat16_like_conv2d():
    x, weight, bias, _ = make_inputs((2, 6, 5, 7, 4), torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = upsample_conv2d(x, weight, bias)
        pytorch = upsample_conv2d_reference(x, weight, bias)
    assert actual.dtype == pytorch.dtype == torch.bfloat16
    exact = upsample_conv2d_reference(
        *(tensor.to(torch.bfloat16).double() for tensor in (x, weight, bias))
    )  # fmt: skip
    assert_as_accurate_as_pytorch(actual, pytorch, exact, torch.bfloat16)


@pytest.mark.parametrize(
    "arguments,error,message",
    [
        ((torch.randn(2, 3, 4), torch.randn(5, 3, 3, 3)), ValueError, "x must have"),
        ((torch.randn(2, 3, 0, 4), torch.randn(5, 3, 3, 3)), ValueError, "x must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(5, 4, 3, 3)), ValueError, "weight must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(5, 3, 5, 5)), ValueError, "weight must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(0, 3, 3, 3)), ValueError, "weight must have"),
        ((torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3), torch.randn(4)), ValueError, "bias"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.int64), torch.randn(5, 3, 3, 3)), TypeError, "x must"),
        ((torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3).double()), TypeError,
         "weight must have the dtype of x"),
        ((torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3), torch.randn(5).double()), TypeError,
         "bias must have the dtype of x"),
        (([[1.0]], torch.randn(5, 3, 3, 3)), TypeError, "x must be a torch.Tensor"),
        ((torch.randn(2, 3, 4, 4), "weight"), TypeError, "weight must be a torch.Tensor"),
    ],
)
def test_bad_input(arguments, error, message):
    with pytest.raises(error, match=message):
        upsample_conv2d(*arguments)


def test_the_layer_matches_upsample_then_conv2d():
    torch.manual_seed(0)
    layer = UpsampleConv2d(5, 3)
    pair = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(5, 3, 3, padding=1))
    pair[1].load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 6, 7)
    torch.testing.assert_close(layer(x), pair(x), rtol=1e-5, atol=1e-5)
    assert set(layer.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("model", ["generator", "vae"])
def test_state_dicts_of_the_separate_upsampling_layout_still_load(model):
    torch.manual_seed(0)
    make = {"generator": lambda: Generator(8, (3, 12, 12), width=4),
            "vae": lambda: VAE((3, 12, 12), latent_dim=8, width=4)}[model]  # fmt: skip
    name = "body" if model == "generator" else "decoder"
    original, fresh = make().eval(), make().eval()
    saved_before = copy.deepcopy(original)
    setattr(saved_before, name, separate_upsampling(getattr(original, name)))
    old_layout = saved_before.state_dict()
    last_old_index = max(int(key.split(".")[1]) for key in old_layout if key.startswith(name))
    assert last_old_index >= len(getattr(fresh, name))  # a key the new layout lacks
    fresh.load_state_dict(old_layout)
    latent = torch.randn(5, 8)
    with torch.no_grad():
        if model == "generator":
            expected, actual = original(latent), fresh(latent)
        else:
            expected, actual = original.decode(latent), fresh.decode(latent)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    fresh.load_state_dict(original.state_dict())  # its own layout loads unchanged
