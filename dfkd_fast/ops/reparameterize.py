"""Batched VAE sampling: the reparameterisation trick and the KL term of the VAE loss.

For mu and logvar of shape (..., D) (Kingma & Welling, "Auto-Encoding Variational Bayes", 2014):

    z  = mu + exp(logvar / 2) * eps,    eps ~ N(0, I),    z of shape (num_samples, ..., D)
    kl = -1/2 * sum_D (1 + logvar - mu^2 - exp(logvar)) = KL(N(mu, diag(e^logvar)) || N(0, I))

Gradients need no stored noise: dz/dmu = 1 and dz/dlogvar = (z - mu) / 2.

The noise eps is Philox4x32-10 + Box-Muller (see csrc/philox.h), keyed by one 64-bit draw from a
``torch.Generator``: the compiled kernels and the reference below produce the same stream, so the
same seed gives the same samples on either backend and on CPU or CUDA (to float rounding).

This module holds the pure-PyTorch reference, the fake and autograd registrations of the compiled
op ``torch.ops.dfkd_fast.reparameterize``, and the public functions.
"""

from __future__ import annotations

import math

import torch

from dfkd_fast import _extension
from dfkd_fast.backend import Implementation, KernelKind, choose_implementation
from dfkd_fast.ops._checks import check_floating_tensor

__all__ = [
    "reparameterize",
    "sample_prior",
    "reparameterize_reference",
    "philox4x32_10_reference",
    "philox_normals_reference",
]

OP_NAME = "reparameterize"
MAX_NUM_SAMPLES = 2**31 - 1
KEY_LOW, KEY_HIGH = -(2**63), 2**63 - 1  # the key is torch.randint(KEY_LOW, KEY_HIGH, (1,))

_MASK32 = 0xFFFFFFFF
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and int64 b in [0, 2^32).

    a is split into 16-bit halves so that no int64 product overflows.
    """
    a_high, a_low = a >> 16, a & 0xFFFF
    low_part = b * a_low  # < 2^48
    high_part = b * a_high  # < 2^48
    partial = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    low = partial & _MASK32
    high = (high_part >> 16) + (partial >> 32)
    return high, low


def philox4x32_10_reference(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding unsigned 32-bit words (broadcasting)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(_PHILOX_ROUNDS):
        hi0, lo0 = _mul_hi_lo(_PHILOX_MULTIPLIERS[0], c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_WEYL[0]) & _MASK32
        k1 = (k1 + _PHILOX_WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def _box_muller(radius_word: torch.Tensor, angle_word: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # The uniforms are formed in float32 exactly as the kernels form them, then used in float64.
    u_radius = radius_word.to(torch.float32) * 2.0**-32 + 2.0**-33  # (0, 1]
    u_angle = angle_word.to(torch.float32) * 2.0**-32  # [0, 1]
    radius = torch.sqrt(-2.0 * torch.log(u_radius.double()))
    angle = (2.0 * math.pi) * u_angle.double()
    return radius * torch.cos(angle), radius * torch.sin(angle)


def philox_normals_reference(
    key: torch.Tensor, num_samples: int, rows: int, row_size: int, first_sample: int = 0
) -> torch.Tensor:
    """The kernels' noise, in float64, shape (num_samples, rows, row_size), for samples
    first_sample .. first_sample + num_samples - 1.

    Element (s, r, d) is lane d % 4 of the Philox block with counter (d // 4, r mod 2^32,
    r div 2^32, s) and key (key mod 2^32, key div 2^32).
    """
    device = key.device
    groups = -(-row_size // 4)
    group = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, groups)
    row = torch.arange(rows, device=device, dtype=torch.int64).view(1, rows, 1)
    sample = torch.arange(
        first_sample, first_sample + num_samples, device=device, dtype=torch.int64
    ).view(num_samples, 1, 1)
    key = key.reshape(())
    words = philox4x32_10_reference(
        (group, row & _MASK32, row >> 32, sample), (key & _MASK32, (key >> 32) & _MASK32)
    )
    shape = (num_samples, rows, groups)
    n0, n1 = _box_muller(words[0].expand(shape), words[1].expand(shape))
    n2, n3 = _box_muller(words[2].expand(shape), words[3].expand(shape))
    lanes = torch.stack((n0, n1, n2, n3), dim=-1)  # (num_samples, rows, groups, 4)
    return lanes.reshape(num_samples, rows, 4 * groups)[..., :row_size]


def draw_key(generator: torch.Generator | None) -> torch.Tensor:
    """The 64-bit key of one call, drawn as the compiled op draws it."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(
        KEY_LOW, KEY_HIGH, (1,), dtype=torch.int64, generator=generator, device=device
    )


def reparameterize_reference(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference, computed in float64.

    Returns z of shape (num_samples, *mu.shape) in mu's dtype and kl of shape mu.shape[:-1] in
    float32 (float64 for float64 inputs). ``noise`` of z's shape replaces the Philox noise, which
    is otherwise drawn exactly as the compiled kernels draw it.
    """
    shape = (num_samples, *mu.shape)
    if noise is None:
        rows, row_size = math.prod(mu.shape[:-1]), mu.shape[-1]
        key = draw_key(generator)
        noise = philox_normals_reference(key, num_samples, rows, row_size).to(mu.device)
    mu64, logvar64 = mu.double(), logvar.double()
    z = mu64 + torch.exp(0.5 * logvar64) * noise.double().reshape(shape)
    kl = -0.5 * torch.sum(1.0 + logvar64 - mu64.square() - torch.exp(logvar64), dim=-1)
    return z.to(mu.dtype), kl.to(torch.promote_types(mu.dtype, torch.float32))


# --------------------------------------------------------------------------------------------
# Registrations of the compiled op: fake (for tracing) and autograd
# --------------------------------------------------------------------------------------------

if _extension.extension_loaded():

    @torch.library.register_fake("dfkd_fast::reparameterize")
    def _reparameterize_fake(mu, logvar, num_samples=1, generator=None):
        _check_inputs(mu, logvar, num_samples, generator)
        z = mu.new_empty((num_samples, *mu.shape))
        kl = mu.new_empty(mu.shape[:-1], dtype=torch.float32)
        return z, kl

    @torch.library.register_fake("dfkd_fast::reparameterize_backward")
    def _reparameterize_backward_fake(grad_z, grad_kl, z, mu, logvar):
        return torch.empty_like(mu), torch.empty_like(logvar)

    def _setup_context(ctx, inputs, output):
        mu, logvar, _num_samples, _generator = inputs
        z, _kl = output
        ctx.save_for_backward(z, mu, logvar)

    def _backward(ctx, grad_z, grad_kl):
        z, mu, logvar = ctx.saved_tensors
        grad_mu, grad_logvar = torch.ops.dfkd_fast.reparameterize_backward(
            grad_z, grad_kl, z, mu, logvar
        )
        return grad_mu, grad_logvar, None, None

    torch.library.register_autograd(
        "dfkd_fast::reparameterize", _backward, setup_context=_setup_context
    )


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def _check_inputs(mu, logvar, num_samples, generator) -> None:
    for name, tensor in (("mu", mu), ("logvar", logvar)):
        check_floating_tensor(name, tensor)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar must have the dtype of mu ({mu.dtype}), got {logvar.dtype}")
    if logvar.device != mu.device:
        raise ValueError(f"logvar must be on the device of mu ({mu.device}), got {logvar.device}")
    if mu.dim() < 1:
        raise ValueError("mu must have at least one dimension (the latent dimension)")
    if logvar.shape != mu.shape:
        raise ValueError(
            f"logvar must have the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise ValueError(f"num_samples must be in [1, 2^31 - 1], got {num_samples}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        if generator.device.type != "cpu" and _indexed(generator.device) != _indexed(mu.device):
            raise ValueError(
                f"generator must be a CPU generator or one on the device of mu ({mu.device}), "
                f"got one on {generator.device}"
            )


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index filled in: torch.Generator("cuda") reports no index."""
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _sample(mu, logvar, num_samples, generator) -> tuple[torch.Tensor, torch.Tensor]:
    implementation = choose_implementation(OP_NAME, KernelKind.EXTENSION, mu.device, mu.dtype)
    if implementation is Implementation.REFERENCE:
        return reparameterize_reference(mu, logvar, num_samples, generator)
    return torch.ops.dfkd_fast.reparameterize(mu, logvar, num_samples, generator)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    return_kl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) drawn inside the kernel.

    Args:
        mu, logvar: tensors of one shape (..., D), float32, float16 or bfloat16 (float64 runs the
            reference); arithmetic is float32.
        num_samples: samples per (mu, logvar) pair.
        generator: the ``torch.Generator`` that keys the noise (the default CPU generator when
            None, for CPU and CUDA tensors alike, so ``torch.manual_seed`` reproduces the samples
            on either device). A CUDA generator keeps the key on the device (CUDA-graph safe).
            Under ``torch.compile`` an explicit generator breaks the graph around this call
            (Dynamo cannot pass generators to operators); with ``fullgraph=True``, leave it None.
        return_kl: also return KL(N(mu, e^logvar) || N(0, I)) summed over the last dimension.

    Returns:
        z of shape (num_samples, *mu.shape), or mu.shape when num_samples == 1; with
        ``return_kl``, the pair (z, kl) with kl of shape mu.shape[:-1] in float32.
    """
    _check_inputs(mu, logvar, num_samples, generator)
    if not isinstance(return_kl, bool):
        raise TypeError(f"return_kl must be a bool, got {type(return_kl).__name__}")
    z, kl = _sample(mu, logvar, num_samples, generator)
    if num_samples == 1:
        z = z.squeeze(0)
    return (z, kl) if return_kl else z


def sample_prior(
    batch: int,
    latent_dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draws (batch, latent_dim) samples of N(0, I) with the reparameterisation kernel.

    The pseudo-replay sampler of a VAE's decoder; same noise stream and generator semantics as
    :func:`reparameterize`.
    """
    for name, value in (("batch", batch), ("latent_dim", latent_dim)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    zeros = torch.zeros(latent_dim, dtype=dtype, device=device)
    _check_inputs(zeros, zeros, batch, generator)
    z, _ = _sample(zeros, zeros, batch, generator)
    return z
