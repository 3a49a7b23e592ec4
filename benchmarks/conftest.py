import pytest

from harness import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
