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
from dfkd_fast.ops.upsample_conv import (
    upsample_conv2d,
    upsample_conv2d_reference,
    upsample_conv2d_subpixel,
)

from .gradients import output_and_gradients
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


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_the_interleaving_reads_and_writes_views_of_larger_tensors(channels_last):
    """The interleaving copies through a strided view of its input's storage: a slice with an
    offset and padded strides must give what each parity's window gives."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    storage = torch.randn(3, 20, 7, 9).contiguous(memory_format=memory_format)
    maps = storage[1:, 4:16, 1:6, 2:9]  # (2, 12, 5, 7): O = 3, H = 4, W = 6
    output = torch.ops.dfkd_fast.interleave_parities(maps)
    by_parity = maps.unflatten(1, (2, 2, 3))
    for a in (0, 1):
        for b in (0, 1):
            expected = by_parity[:, a, b, :, a : a + 4, b : b + 6]
            torch.testing.assert_close(output[:, :, a::2, b::2], expected, rtol=0, atol=0)
    grad_output = torch.randn(3, 3, 9, 13).contiguous(memory_format=memory_format)[1:, :, 1:, 1:]
    grad_maps = torch.ops.dfkd_fast.interleave_parities_backward(grad_output)
    by_parity = grad_maps.unflatten(1, (2, 2, 3))
    for a in (0, 1):
        for b in (0, 1):
            window = by_parity[:, a, b, :, a : a + 4, b : b + 6]
            torch.testing.assert_close(window, grad_output[:, :, a::2, b::2], rtol=0, atol=0)


def test_the_interleaving_backward_zeroes_what_no_output_reads():
    grad_output = torch.randn(1, 2, 4, 6)
    grad_maps = torch.ops.dfkd_fast.interleave_parities_backward(grad_output)
    maps = torch.randn_like(grad_maps).requires_grad_()
    (torch.ops.dfkd_fast.interleave_parities(maps) * grad_output).sum().backward()
    torch.testing.assert_close(grad_maps, maps.grad, rtol=0, atol=0)
    by_parity = grad_maps.unflatten(1, (2, 2, 2))
    assert by_parity[:, 0, :, :, -1].eq(0).all() and by_parity[:, 1, :, :, 0].eq(0).all()
    assert by_parity[:, :, 0, :, :, -1].eq(0).all() and by_parity[:, :, 1, :, :, 0].eq(0).all()


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
