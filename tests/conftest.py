"""Shared fixtures: the devices to test on, and where the offline data sets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])
SHARED_ENV_VAR = "DFKD_FAST_SHARED"

requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def shared_dir() -> Path:
    """The folder with data/ and models/ (env DFKD_FAST_SHARED, default ../shared)."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get(SHARED_ENV_VAR, default))
