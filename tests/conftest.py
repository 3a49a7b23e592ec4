"""Shared fixtures: the devices to test on."""

from __future__ import annotations

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])

requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)

