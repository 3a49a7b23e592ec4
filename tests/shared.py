"""The offline data sets and pretrained teachers of ../shared, for the tests that use them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_ENV_VAR = "DFKD_FAST_SHARED"
REPOSITORY = Path(__file__).resolve().parents[1]


def shared_path(*parts: str) -> Path:
    """A file under $DFKD_FAST_SHARED (default ../shared); skips the test when it is absent."""
    root = Path(os.environ.get(SHARED_ENV_VAR, REPOSITORY.parent / "shared"))
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"{path} not found: set {SHARED_ENV_VAR} to the folder holding data/ and models/"
        )
    return path


def pretrained_resnet_path(depth: int) -> Path:
    names = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th",
             44: "resnet44-014dd654.th", 56: "resnet56-4bfd9763.th"}  # fmt: skip
    return shared_path("models", "cifar10-resnet", names[depth])
