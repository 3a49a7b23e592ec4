"""Outputs and gradients of a layer-like op, for comparing implementations in the tests."""

from __future__ import annotations

import torch


def output_and_gradients(function, x, weight, bias, *arguments, grad_output=None):
    """[output, d x, d weight(, d bias)] of ``function(x, weight, bias, *arguments)`` for the
    output gradient given (a seeded normal one if None), on detached copies of the inputs."""
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    output = function(x, weight, bias, *arguments)
    if grad_output is None:
        g = torch.Generator().manual_seed(1)
        grad_output = torch.randn(output.shape, generator=g, dtype=torch.float64)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return [output, *torch.autograd.grad(output, inputs, grad_output.to(output.dtype))]
