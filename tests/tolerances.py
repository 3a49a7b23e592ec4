"""The one tolerance table of the test suite.

Kernels compute in float32 and round their outputs to the input dtype; references compute in
float64. So an output may differ from the reference by half a unit in the last place of its dtype
(2^-24, 2^-11 and 2^-8 relative for float32, float16 and bfloat16) plus the float32 error of the
kernel's own arithmetic. Each tolerance is about twice the worst error measured on the tests'
inputs (measured on this project's CPU kernels); see the comment beside each entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(
            actual.double().cpu(), expected.double().cpu(), rtol=self.rtol, atol=self.atol
        )


# Samples z = mu + exp(logvar / 2) * eps against the float64 formula with the same eps.
# float32: measured max abs. error 7.2e-7 (exp and the product carry a few float32 ulps).
# float16 / bfloat16: measured max rel. errors 4.85e-4 and 3.89e-3, i.e. the half ulp of rounding.
SAMPLE = {
    torch.float32: Tolerance(rtol=1e-6, atol=1.5e-6),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=8e-3, atol=1e-5),
}

# The kernels' float32 noise against the float64 Box-Muller of the same Philox words
# (float32 log, sqrt and sin/cos): measured max abs. error 4.2e-7, max rel. error 2.8e-7.
NOISE = Tolerance(rtol=1e-6, atol=1e-6)

# The KL divergence, accumulated in float32 over up to 70001 terms, against float64:
# measured max rel. error 2.7e-7.
KL = Tolerance(rtol=1e-6, atol=1e-6)

# Input gradients against float64 autograd. d/dlogvar uses 0.5 (z - mu) with z already rounded
# to the dtype, so its absolute error is about half an ulp of |z| times |grad_z| per sample:
# measured max abs. errors 8.8e-7, 3.3e-3 and 3.1e-2 for float32, float16 and bfloat16.
GRAD = {
    torch.float32: Tolerance(rtol=2e-6, atol=2e-6),
    torch.float16: Tolerance(rtol=2e-3, atol=8e-3),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=6e-2),
}

# kd_div / js_div. Losses are float32 whatever the input dtype; they are compared as divergences
# (loss / T^2, in nats) against float64 of the same (already rounded) inputs: measured max rel.
# error 6e-7, and absolute errors of a few 1e-7 nats where log-normalisers cancel.
KD_LOSS = Tolerance(rtol=1e-6, atol=1e-6)

# Gradients are rounded to the input dtype and compared in units of
# T * max |d loss / d row divergence|. Element-wise rtol is twice the dtype's rounding; atol is
# about twice the worst absolute error left over: 2.5e-6 (KL) and 8.1e-8 (JS) in float32, 3.5e-6
# in float16 (the spacing of its subnormals), negligible in bfloat16.
KD_GRAD = {
    torch.float32: Tolerance(rtol=1e-5, atol=5e-6),
    torch.float16: Tolerance(rtol=1e-3, atol=7e-6),
    torch.bfloat16: Tolerance(rtol=8e-3, atol=1e-8),
}
JS_GRAD = {
    torch.float32: Tolerance(rtol=1e-5, atol=2e-7),
    torch.float16: Tolerance(rtol=1e-3, atol=7e-6),
    torch.bfloat16: Tolerance(rtol=8e-3, atol=1e-8),
}

# bn_stats / bn_stat_loss. Statistics and the loss are float32 whatever the input dtype, against
# float64 of the same (already rounded) inputs: measured max rel. errors 4.2e-7 and 2.3e-7 (and
# 7.9e-8 absolute on statistics near 0).
# Gradients and the fused BatchNorm output are rounded to the input dtype (rtol twice that); atol
# is about twice the worst left over: 1.1e-7 (float32 gradients), 3e-8 (float16, the spacing of its
# subnormals), 3e-7 (float32 output).
BN_STATS = Tolerance(rtol=1e-6, atol=2e-7)
BN_LOSS = Tolerance(rtol=1e-6, atol=1e-7)
BN_GRAD = {
    torch.float32: Tolerance(rtol=1e-5, atol=2e-7),
    torch.float16: Tolerance(rtol=1e-3, atol=6e-8),
    torch.bfloat16: Tolerance(rtol=8e-3, atol=1e-9),
}
BN_OUTPUT = {
    torch.float32: Tolerance(rtol=1e-5, atol=6e-7),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-9),
    torch.bfloat16: Tolerance(rtol=8e-3, atol=1e-9),
}

# Whole float32 networks against float64 (input gradients and logits): the floor is the network's
# own float32 error, measured with PyTorch's ops alone on the pretrained CIFAR ResNets: input
# gradients needed atol 1.0e-7 (ResNet-20) and 5.7e-7 (ResNet-56) at rtol 1e-5.
NETWORK = Tolerance(rtol=1e-5, atol=1.2e-6)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Whole float32 networks' logits against float64. Every logit sums the same float32
    features, so its error scales with the largest logit, not with its own size: with PyTorch's
    ops alone, the pretrained CIFAR ResNet-20 and -56 measured max abs. error / max |logit| of
    4.3e-7 and 3.5e-7 on an AMD EPYC without AVX-512 (its convolutions are not oneDNN's)."""
    scale = float(expected.detach().abs().max())
    Tolerance(rtol=1e-5, atol=1e-6 * scale).assert_close(actual, expected)


# upsample_conv2d (2x2 kernels on the input) against float64, measured in units of PyTorch's own
# error for the same computation in the same dtype (interpolate + conv2d): outputs and gradients
# came within 1.95x of it in float32 and 2.4x in bfloat16 (the bias gradient, whose four parity
# sums are rounded to bfloat16 before they are added). Allowed: twice PyTorch's error plus two
# roundings of the largest value, the floor where PyTorch happens to be exact. In float64, which
# is the reference's own dtype, the error is measured against the largest value: at most 2.2e-15.
UPSAMPLE_CONV_ERROR_RATIO = 2.0
UPSAMPLE_CONV_FLOAT64_ERROR = 5e-15


def assert_as_accurate_as_pytorch(actual, pytorch, exact, dtype: torch.dtype) -> None:
    error = (actual.double() - exact).abs().max()
    largest = exact.abs().max()
    if dtype == torch.float64:
        allowed = UPSAMPLE_CONV_FLOAT64_ERROR * largest
        assert error <= allowed, f"max error {error:.3g}, {error / largest:.3g} of the largest"
        return
    pytorch_error = (pytorch.double() - exact).abs().max()
    allowed = UPSAMPLE_CONV_ERROR_RATIO * (pytorch_error + torch.finfo(dtype).eps * largest)
    assert error <= allowed, f"max error {error:.3g}, PyTorch's {pytorch_error:.3g}"
