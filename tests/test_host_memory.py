"""retain_freed_host_memory: checked in child processes, since it changes the whole process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from dfkd_fast.host_memory import MMAP_THRESHOLD, has_glibc_malloc, retain_freed_host_memory

GLIBC = has_glibc_malloc()

# Holds eight 4 MiB tensors at once and frees them, as a training step's activations come and
# go, and prints the minor page faults that 50 rounds took after 5 rounds of warm-up (in which
# glibc's own dynamic thresholds have their chance: by default they serve the blocks from the
# heap, then give its 32 MiB top back to the system at each round).
FAULT_PROBE = """
import json, resource, sys, torch
from dfkd_fast.host_memory import retain_freed_host_memory
retained = retain_freed_host_memory() if sys.argv[1] == "retain" else False
def one_round():
    activations = [torch.ones(1 << 20) for _ in range(8)]
    return sum(tensor.sum() for tensor in activations)
for _ in range(5):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    one_round()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": retained, "faults": faults}))
"""


ROUND_PAGES = 8 * (4 << 20) // resource.getpagesize()


def probe_faults(mode: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", FAULT_PROBE, mode], check=True,
                               capture_output=True, text=True)  # fmt: skip
    return json.loads(completed.stdout)


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the call returns False")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = probe_faults("default"), probe_faults("retain")
    assert retained["retained"] is True
    # a round of fresh blocks faults in 8,192 pages, so by default 50 rounds fault about 400,000.
    # Retained, the blocks come from the heap that the warm-up faulted in. In about one run of
    # four the heap still grows once, by two blocks (2,048 faults, which the thread pool's fill
    # splits between its threads); that never recurs: 200 rounds fault the same 2,048 as 50.
    assert retained["faults"] < ROUND_PAGES, retained
    assert default["faults"] > 25 * ROUND_PAGES, default


@pytest.mark.skipif(GLIBC, reason="on glibc the call succeeds")
def test_without_glibc_nothing_changes():
    assert retain_freed_host_memory() is False


@pytest.mark.parametrize(
    "arguments, error",
    [
        ({"mmap_threshold": MMAP_THRESHOLD + 1}, ValueError),
        ({"mmap_threshold": -1}, ValueError),
        ({"trim_threshold": 2**31}, ValueError),
        ({"trim_threshold": 1.5}, TypeError),
        ({"mmap_threshold": True}, TypeError),
    ],
)
def test_bad_thresholds_are_refused_by_name(arguments, error):
    with pytest.raises(error, match=next(iter(arguments))):
        retain_freed_host_memory(**arguments)
