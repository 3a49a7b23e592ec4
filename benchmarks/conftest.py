import pytest

from dfkd_fast.host_memory import retain_freed_host_memory
from harness import DEVICES


def pytest_configure(config):
    # as the CLI does: CPU timings without the page faults of freshly mapped blocks
    retain_freed_host_memory()


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
