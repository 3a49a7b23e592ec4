"""dfkd_fast.reparameterize and sample_prior: stream, formula, statistics, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dfkd_fast
from dfkd_fast.ops.reparameterize import (
    draw_key,
    philox4x32_10_reference,
    philox_normals_reference,
    reparameterize_reference,
)

from .conftest import requires_cuda
from .tolerances import GRAD, KL, NOISE, SAMPLE

KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, row_size, num_samples): odd row sizes cross Philox groups and vector widths.
SHAPES = [(1, 1, 1), (3, 5, 2), (17, 7, 3), (4, 64, 1), (2, 1031, 2), (5, 4099, 1)]


def kernel_noise(seed: int, mu: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The float32 noise the kernel draws for `mu`'s shape under `seed` (z of mu = logvar = 0)."""
    zeros = torch.zeros(mu.shape, dtype=torch.float32, device=mu.device)
    torch.manual_seed(seed)
    z, _ = torch.ops.dfkd_fast.reparameterize(zeros, zeros, num_samples, None)
    return z


def random_inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    logvar = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return mu, logvar


# ------------------------------------------------------------------------------------------
# The random stream
# ------------------------------------------------------------------------------------------

# Random123's published known-answer vectors for Philox4x32-10: (counter, key, output).
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KNOWN_ANSWERS)
def test_reference_philox_matches_known_answers(counter, key, expected):
    words = philox4x32_10_reference(
        tuple(torch.tensor(c) for c in counter), tuple(torch.tensor(k) for k in key)
    )
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("rows,row_size,num_samples", SHAPES)
def test_kernel_noise_is_the_reference_philox_stream(device, rows, row_size, num_samples):
    mu = torch.zeros(rows, row_size, device=device)
    noise = kernel_noise(7, mu, num_samples)
    torch.manual_seed(7)
    key = draw_key(None)
    expected = philox_normals_reference(key, num_samples, rows, row_size)
    NOISE.assert_close(noise.cpu(), expected)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    row_size=st.integers(1, 70),
    num_samples=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_kernel_noise_is_the_reference_stream_for_any_shape(rows, row_size, num_samples, seed):
    mu = torch.zeros(rows, row_size)
    noise = kernel_noise(seed, mu, num_samples)
    torch.manual_seed(seed)
    expected = philox_normals_reference(draw_key(None), num_samples, rows, row_size)
    NOISE.assert_close(noise, expected)


def test_reference_backend_reproduces_the_kernel_samples(device):
    mu, logvar = random_inputs((6, 33), torch.float32, device)
    torch.manual_seed(3)
    z_kernel, kl_kernel = dfkd_fast.reparameterize(mu, logvar, 2, return_kl=True)
    torch.manual_seed(3)
    with dfkd_fast.use_backend("reference"):
        z_ref, kl_ref = dfkd_fast.reparameterize(mu, logvar, 2, return_kl=True)
    SAMPLE[torch.float32].assert_close(z_kernel, z_ref)
    KL.assert_close(kl_kernel, kl_ref)


def test_same_seed_gives_the_same_samples(device):
    mu, logvar = random_inputs((64, 10), torch.float32, device)
    torch.manual_seed(123)
    first = dfkd_fast.reparameterize(mu, logvar, 4)
    torch.manual_seed(123)
    second = dfkd_fast.reparameterize(mu, logvar, 4)
    assert torch.equal(first, second)
    generator = torch.Generator().manual_seed(5)
    third = dfkd_fast.reparameterize(mu, logvar, 4, generator=generator)
    generator.manual_seed(5)
    assert torch.equal(third, dfkd_fast.reparameterize(mu, logvar, 4, generator=generator))


def test_explicit_generator_leaves_the_default_one_alone():
    mu = torch.zeros(1000)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    dfkd_fast.reparameterize(mu, mu, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)


def test_successive_calls_draw_independent_streams(device):
    mu = torch.zeros(200_000, device=device)
    torch.manual_seed(0)
    first = dfkd_fast.reparameterize(mu, mu).double()
    second = dfkd_fast.reparameterize(mu, mu).double()
    assert not torch.equal(first, second)
    correlation = torch.corrcoef(torch.stack((first, second)))[0, 1].item()
    assert abs(correlation) < 5 / math.sqrt(mu.numel())


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_cpu_and_cuda_give_the_same_samples(dtype):
    mu, logvar = random_inputs((33, 77), dtype, "cpu")
    torch.manual_seed(11)
    z_cpu, kl_cpu = dfkd_fast.reparameterize(mu, logvar, 3, return_kl=True)
    torch.manual_seed(11)
    z_cuda, kl_cuda = dfkd_fast.reparameterize(mu.cuda(), logvar.cuda(), 3, return_kl=True)
    SAMPLE[dtype].assert_close(z_cuda.cpu(), z_cpu)
    KL.assert_close(kl_cuda.cpu(), kl_cpu)


@requires_cuda
def test_cuda_generator_keeps_the_key_on_the_device():
    mu, logvar = random_inputs((8, 16), torch.float32, "cuda")
    generator = torch.Generator(device="cuda").manual_seed(9)
    first = dfkd_fast.reparameterize(mu, logvar, generator=generator)
    generator.manual_seed(9)
    with dfkd_fast.use_backend("reference"):
        expected = dfkd_fast.reparameterize(mu, logvar, generator=generator)
    SAMPLE[torch.float32].assert_close(first, expected)


@requires_cuda
@pytest.mark.parametrize("device", ["cuda", torch.device("cuda")], ids=["string", "device"])
def test_a_cuda_generator_without_an_index_is_on_the_current_device(device):
    # the distillation engine makes its generator as torch.Generator(torch.device("cuda"))
    mu, logvar = random_inputs((8, 16), torch.float32, "cuda:0")
    generator = torch.Generator(device).manual_seed(9)
    first = dfkd_fast.reparameterize(mu, logvar, generator=generator)
    z, _ = torch.ops.dfkd_fast.reparameterize(mu, logvar, 1, generator.manual_seed(9))
    SAMPLE[torch.float32].assert_close(z.reshape(first.shape), first)


# ------------------------------------------------------------------------------------------
# The distribution
# ------------------------------------------------------------------------------------------


def ks_statistic_against_standard_normal(values: torch.Tensor) -> float:
    ordered = values.double().flatten().sort().values
    n = ordered.numel()
    cdf = 0.5 * (1.0 + torch.erf(ordered / math.sqrt(2.0)))
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_samples_have_the_moments_and_law_of_the_normal(device, dtype):
    mu, logvar = random_inputs((8, 125), dtype, device, seed=1)
    num_samples = 1000  # 10^6 samples in all
    torch.manual_seed(2024)
    z = dfkd_fast.reparameterize(mu, logvar, num_samples).double().cpu()
    eps = (z - mu.double().cpu()) / torch.exp(0.5 * logvar.double().cpu())
    n = eps.numel()
    assert n >= 10**6
    # Half a unit of rounding in z becomes bias in eps for float16 / bfloat16: widen by it.
    rounding = {torch.float32: 0.0, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert abs(eps.mean().item()) < 5 / math.sqrt(n) + rounding
    assert abs(eps.var().item() - 1.0) < 5 * math.sqrt(2 / n) + rounding
    if dtype == torch.float32:
        # Kolmogorov-Smirnov at the 0.1% level, skewness and kurtosis within 5 standard errors.
        assert ks_statistic_against_standard_normal(eps) < 1.95 / math.sqrt(n)
        standardised = (eps - eps.mean()) / eps.std()
        assert abs(standardised.pow(3).mean().item()) < 5 * math.sqrt(6 / n)
        assert abs(standardised.pow(4).mean().item() - 3.0) < 5 * math.sqrt(24 / n)
        # The tails: P(|eps| > 4) = 6.33e-5, about 63 of 10^6 (Poisson sd ~ 8).
        assert 30 <= int((eps.abs() > 4).sum()) <= 100


def test_every_lane_and_sample_is_unbiased_and_uncorrelated():
    mu = torch.zeros(4096, 8)
    torch.manual_seed(99)
    eps = dfkd_fast.reparameterize(mu, mu, num_samples=8).double()  # (8, 4096, 8)
    per_lane = eps.reshape(8, 4096, 2, 4).permute(3, 0, 1, 2).reshape(4, -1)
    n = per_lane.shape[1]
    assert per_lane.mean(dim=1).abs().max().item() < 5 / math.sqrt(n)
    assert (per_lane.var(dim=1) - 1).abs().max().item() < 5 * math.sqrt(2 / n)
    flat = eps.flatten()
    neighbours = torch.corrcoef(torch.stack((flat[:-1], flat[1:])))[0, 1].item()
    samples = torch.corrcoef(torch.stack((eps[0].flatten(), eps[1].flatten())))[0, 1].item()
    rows = torch.corrcoef(torch.stack((eps[:, 0].flatten(), eps[:, 1].flatten())))[0, 1].item()
    assert abs(neighbours) < 5 / math.sqrt(flat.numel())
    assert abs(samples) < 5 / math.sqrt(eps[0].numel())
    assert abs(rows) < 5 / math.sqrt(eps[:, 0].numel())


# ------------------------------------------------------------------------------------------
# The formula
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("rows,row_size,num_samples", SHAPES)
def test_samples_follow_the_formula_with_injected_noise(
    device, dtype, rows, row_size, num_samples
):
    mu, logvar = random_inputs((rows, row_size), dtype, device, seed=rows * row_size)
    noise = kernel_noise(5, mu, num_samples)
    torch.manual_seed(5)
    z, kl = torch.ops.dfkd_fast.reparameterize(mu, logvar, num_samples, None)
    expected_z, expected_kl = reparameterize_reference(
        mu.double(), logvar.double(), num_samples, noise=noise
    )
    assert z.dtype == dtype and z.shape == (num_samples, rows, row_size)
    assert kl.dtype == torch.float32 and kl.shape == (rows,)
    SAMPLE[dtype].assert_close(z, expected_z)
    KL.assert_close(kl, expected_kl)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kl_matches_the_closed_form_of_torch_distributions(device, dtype):
    mu, logvar = random_inputs((9, 3, 50), dtype, device, seed=4)
    _, kl = dfkd_fast.reparameterize(mu, logvar, return_kl=True)
    posterior = torch.distributions.Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    prior = torch.distributions.Normal(torch.zeros_like(posterior.loc), 1.0)
    expected = torch.distributions.kl_divergence(posterior, prior).sum(-1)
    assert kl.shape == (9, 3)
    KL.assert_close(kl, expected)


def test_long_rows_sum_their_kl_over_several_parts(device):
    mu, logvar = random_inputs((3, 70_001), torch.float32, device, seed=8)
    _, kl = dfkd_fast.reparameterize(mu, logvar, return_kl=True)
    _, expected = reparameterize_reference(
        mu.double(), logvar.double(), noise=torch.zeros(1, 3, 70_001, device=device)
    )
    KL.assert_close(kl, expected)


def test_shapes_of_the_outputs(device):
    mu = torch.zeros(5, device=device)
    z, kl = dfkd_fast.reparameterize(mu, mu, return_kl=True)
    assert z.shape == (5,) and kl.shape == ()
    mu3 = torch.zeros(2, 3, 4, device=device)
    assert dfkd_fast.reparameterize(mu3, mu3, 6).shape == (6, 2, 3, 4)
    empty_rows = torch.zeros(0, 4, device=device)
    z, kl = dfkd_fast.reparameterize(empty_rows, empty_rows, 2, return_kl=True)
    assert z.shape == (2, 0, 4) and kl.shape == (0,)
    no_latent = torch.zeros(3, 0, device=device)
    z, kl = dfkd_fast.reparameterize(no_latent, no_latent, return_kl=True)
    assert z.shape == (3, 0) and torch.equal(kl, torch.zeros(3, device=device))


def test_non_contiguous_inputs_give_the_samples_of_their_contiguous_copies(device):
    base_mu, base_logvar = random_inputs((80, 30), torch.float32, device)
    mu, logvar = base_mu[:40].t(), base_logvar[::2].t()  # (30, 40): transposed, and strided
    assert not mu.is_contiguous() and not logvar.is_contiguous()
    torch.manual_seed(1)
    z, kl = dfkd_fast.reparameterize(mu, logvar, 2, return_kl=True)
    torch.manual_seed(1)
    z_copy, kl_copy = dfkd_fast.reparameterize(
        mu.contiguous(), logvar.contiguous(), 2, return_kl=True
    )
    assert torch.equal(z, z_copy) and torch.equal(kl, kl_copy)


def test_extreme_logvar_and_mu(device):
    mu = torch.tensor([[0.0, 1e30, -3.0, 2.0, 0.5, 1.0]], device=device)
    logvar = torch.tensor([[-math.inf, 0.0, 200.0, -200.0, math.nan, 60.0]], device=device)
    noise = kernel_noise(0, mu, 1)
    torch.manual_seed(0)
    z, kl = dfkd_fast.reparameterize(mu, logvar, return_kl=True)
    z = z.cpu()
    eps = noise[0, 0].cpu()
    assert z[0, 0] == 0.0  # std = exp(-inf) = 0
    assert z[0, 1] == 1e30
    assert math.isinf(z[0, 2]) and (z[0, 2] > 0) == (eps[2] > 0)  # exp(100) overflows float32
    assert z[0, 3] == 2.0  # exp(-100) is a denormal, lost against 2
    assert math.isnan(z[0, 4])
    SAMPLE[torch.float32].assert_close(z[0, 5], torch.tensor(1.0 + math.exp(30.0) * float(eps[5])))
    assert torch.isnan(kl).all()  # a NaN logvar makes the row's KL NaN


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("outputs_used", ["z", "kl", "both"])
def test_gradients_match_float64_autograd_of_the_reference(
    device, dtype, num_samples, outputs_used
):
    rows, row_size = 7, 37
    mu, logvar = random_inputs((rows, row_size), dtype, device, seed=num_samples)
    noise = kernel_noise(17, mu, num_samples)
    grads = torch.Generator().manual_seed(1)
    grad_z = torch.randn((num_samples, rows, row_size), generator=grads).to(device)
    grad_kl = torch.randn((rows,), generator=grads).to(device)

    mu_k, logvar_k = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    torch.manual_seed(17)
    z, kl = dfkd_fast.reparameterize(mu_k, logvar_k, num_samples, return_kl=True)
    z = z.reshape(num_samples, rows, row_size)

    mu64, logvar64 = mu.double().requires_grad_(), logvar.double().requires_grad_()
    z64, kl64 = reparameterize_reference(mu64, logvar64, num_samples, noise=noise)

    def loss(z_, kl_):
        terms = []
        if outputs_used in ("z", "both"):
            terms.append((z_.double() * grad_z.double()).sum())
        if outputs_used in ("kl", "both"):
            terms.append((kl_.double() * grad_kl.double()).sum())
        return sum(terms)

    loss(z, kl).backward()
    loss(z64, kl64).backward()
    GRAD[dtype].assert_close(mu_k.grad, mu64.grad)
    GRAD[dtype].assert_close(logvar_k.grad, logvar64.grad)


# ------------------------------------------------------------------------------------------
# PyTorch integration
# ------------------------------------------------------------------------------------------


def test_opcheck(device):
    mu, logvar = random_inputs((4, 9), torch.float32, device)
    torch.library.opcheck(
        torch.ops.dfkd_fast.reparameterize.default,
        (mu.requires_grad_(), logvar.requires_grad_(), 3, None),
    )
    z, _ = torch.ops.dfkd_fast.reparameterize(mu.detach(), logvar.detach(), 3, None)
    grad_z, grad_kl = torch.randn_like(z), torch.randn(4, device=device)
    for args in [(grad_z, grad_kl), (grad_z, None), (None, grad_kl)]:
        torch.library.opcheck(
            torch.ops.dfkd_fast.reparameterize_backward.default,
            (*args, z, mu.detach(), logvar.detach()),
        )


def test_torch_compile_fullgraph_matches_eager(device):
    mu, logvar = random_inputs((16, 24), torch.float32, device)

    def vae_sampling_loss(mu, logvar):
        z, kl = dfkd_fast.reparameterize(mu, logvar, num_samples=2, return_kl=True)
        return z.square().mean() + 0.1 * kl.mean()

    compiled = torch.compile(vae_sampling_loss, fullgraph=True)
    results = []
    for function in (compiled, vae_sampling_loss):
        leaf_mu, leaf_logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        torch.manual_seed(21)
        loss = function(leaf_mu, leaf_logvar)
        loss.backward()
        results.append((loss.detach(), leaf_mu.grad, leaf_logvar.grad))
    for compiled_value, eager_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value)


def test_torch_compile_with_an_explicit_generator_breaks_the_graph_but_works():
    mu = torch.zeros(4, 8)

    def doubled_samples(mu, generator):
        return 2 * dfkd_fast.reparameterize(mu, mu, generator=generator)

    compiled = torch.compile(doubled_samples)
    first = compiled(mu, torch.Generator().manual_seed(8))
    assert torch.equal(first, doubled_samples(mu, torch.Generator().manual_seed(8)))


# ------------------------------------------------------------------------------------------
# sample_prior
# ------------------------------------------------------------------------------------------


def test_sample_prior_is_the_kernel_stream_of_zeros(device):
    torch.manual_seed(4)
    prior = dfkd_fast.sample_prior(5, 12, device=device)
    torch.manual_seed(4)
    key = draw_key(None)
    assert prior.shape == (5, 12) and prior.dtype == torch.float32
    NOISE.assert_close(prior.cpu(), philox_normals_reference(key, 5, 1, 12)[:, 0])
    assert dfkd_fast.sample_prior(1, 3, device=device).shape == (1, 3)
    assert dfkd_fast.sample_prior(2, 3, dtype=torch.bfloat16, device=device).dtype == torch.bfloat16


def test_sample_prior_moments():
    samples = dfkd_fast.sample_prior(10_000, 100, generator=torch.Generator().manual_seed(0))
    n = samples.numel()
    assert abs(samples.double().mean().item()) < 5 / math.sqrt(n)
    assert abs(samples.double().var().item() - 1) < 5 * math.sqrt(2 / n)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(batch=0, latent_dim=3), ValueError, "batch"),
        (dict(batch=2, latent_dim=0), ValueError, "latent_dim"),
        (dict(batch=2.0, latent_dim=3), TypeError, "batch"),
        (dict(batch=2, latent_dim=3, dtype=torch.int32), TypeError, "dtype"),
        (dict(batch=2, latent_dim=3, generator="seed"), TypeError, "generator"),
    ],
)
def test_sample_prior_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        dfkd_fast.sample_prior(**kwargs)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

GOOD = torch.zeros(3, 4)


@pytest.mark.parametrize(
    "mu,logvar,kwargs,error,match",
    [
        (GOOD, torch.zeros(3, 5), {}, ValueError, "logvar must have the shape of mu"),
        (GOOD, torch.zeros(4, 3), {}, ValueError, "logvar must have the shape of mu"),
        (torch.zeros(3, 4, dtype=torch.int64), GOOD, {}, TypeError, "mu must be a floating"),
        (GOOD, torch.zeros(3, 4, dtype=torch.int32), {}, TypeError, "logvar must be a floating"),
        (GOOD, GOOD.half(), {}, TypeError, "logvar must have the dtype of mu"),
        (GOOD, torch.zeros(3, 4, device="meta"), {}, ValueError, "logvar must be on the device"),
        (torch.tensor(0.0), torch.tensor(0.0), {}, ValueError, "mu must have at least one"),
        (GOOD, GOOD, dict(num_samples=0), ValueError, "num_samples"),
        (GOOD, GOOD, dict(num_samples=-2), ValueError, "num_samples"),
        (GOOD, GOOD, dict(num_samples=2**31), ValueError, "num_samples"),
        (GOOD, GOOD, dict(num_samples=2.0), TypeError, "num_samples"),
        (GOOD, GOOD, dict(num_samples=True), TypeError, "num_samples"),
        (GOOD, GOOD, dict(generator=3), TypeError, "generator"),
        (GOOD, GOOD, dict(return_kl="yes"), TypeError, "return_kl"),
        ([0.0, 1.0], GOOD, {}, TypeError, "mu must be a torch.Tensor"),
    ],
)
def test_bad_input_is_rejected_with_the_argument_named(mu, logvar, kwargs, error, match):
    with pytest.raises(error, match=match):
        dfkd_fast.reparameterize(mu, logvar, **kwargs)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((GOOD, torch.zeros(3, 5), 1, None), ValueError, "logvar must have the shape of mu"),
        ((GOOD.long(), GOOD.long(), 1, None), TypeError, "mu must be float32"),
        ((GOOD.double(), GOOD.double(), 1, None), TypeError, "mu must be float32"),
        ((GOOD, GOOD.half(), 1, None), TypeError, "logvar must have the dtype of mu"),
        ((GOOD, GOOD, 0, None), ValueError, "num_samples"),
        ((torch.tensor(0.0), torch.tensor(0.0), 1, None), ValueError, "mu must have at least one"),
    ],
)
def test_the_compiled_op_itself_raises_python_errors_on_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.dfkd_fast.reparameterize(*args)


@requires_cuda
def test_mixed_devices_and_foreign_generators_are_rejected():
    with pytest.raises(ValueError, match="logvar must be on the device of mu"):
        dfkd_fast.reparameterize(GOOD, GOOD.cuda())
    with pytest.raises(ValueError, match="generator"):
        dfkd_fast.reparameterize(GOOD, GOOD, generator=torch.Generator(device="cuda"))


# ------------------------------------------------------------------------------------------
# Size
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_more_than_two_to_the_31_elements():
    rows, row_size = 1024, 1024  # 2^20 elements per sample
    num_samples = 2**11 + 1  # z has 2^31 + 2^20 elements: offsets need 64 bits
    mu, logvar = random_inputs((rows, row_size), torch.float16, "cpu", seed=2)
    torch.manual_seed(31)
    z = dfkd_fast.reparameterize(mu, logvar, num_samples)
    assert z.numel() > 2**31
    torch.manual_seed(31)
    key = draw_key(None)
    for sample in (0, num_samples - 1):
        noise = philox_normals_reference(key, 1, rows, row_size, first_sample=sample)
        expected, _ = reparameterize_reference(mu.double(), logvar.double(), 1, noise=noise)
        SAMPLE[torch.float16].assert_close(z[sample], expected[0])
