"""Batched VAE sampling: dfkd_fast.reparameterize against eager PyTorch and torch.compile.

The baseline is the usual expression, mu + exp(logvar / 2) * randn_like(mu), plus the KL sum,
at 2^16 to 2^26 elements of (rows, 64) float32. Run:

    python -m pytest benchmarks/bench_memory.py benchmarks/bench_reparameterize.py \
        --benchmark-json=out.json
    python benchmarks/report.py out.json
"""

from __future__ import annotations

import pytest
import torch

import dfkd_fast
from harness import describe, timed

LATENT_DIM = 64
SIZES = [2**16, 2**18, 2**20, 2**22, 2**24, 2**26]


def eager_reparameterize(mu: torch.Tensor, logvar: torch.Tensor):
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    kl = -0.5 * torch.sum(1.0 + logvar - mu * mu - torch.exp(logvar), dim=-1)
    return z, kl


def fused_reparameterize(mu: torch.Tensor, logvar: torch.Tensor):
    return dfkd_fast.reparameterize(mu, logvar, return_kl=True)


IMPLEMENTATIONS = {
    "dfkd_fast": lambda: fused_reparameterize,
    "eager": lambda: eager_reparameterize,
    "torch.compile": lambda: torch.compile(eager_reparameterize, dynamic=False),
}


def bytes_moved(numel: int, element_size: int) -> int:
    """Read mu and logvar, write z; the KL (numel / LATENT_DIM floats) is negligible."""
    return 3 * numel * element_size + (numel // LATENT_DIM) * 4


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_reparameterize(benchmark, device, implementation, numel):
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(numel // LATENT_DIM, LATENT_DIM, generator=generator).to(device)
    logvar = (0.1 * torch.randn(mu.shape, generator=generator)).to(device)
    function = IMPLEMENTATIONS[implementation]()
    run = timed(lambda: function(mu, logvar), device)
    for _ in range(3):  # compile and warm up outside the timed rounds
        run()
    describe(
        benchmark,
        device,
        op="reparameterize",
        implementation=implementation,
        numel=numel,
        dtype="float32",
        bytes=bytes_moved(numel, 4),
    )
    benchmark.pedantic(run, rounds=max(5, min(100, 2**26 // numel)), warmup_rounds=1)
