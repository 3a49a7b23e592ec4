"""The random streams of a run. The main stream (latents, shifts, mixing) is seeded with the
config's seed itself; every other one with `stream_seed(seed, stream)`, so that no stream
repeats another's draws."""

from __future__ import annotations

import numpy as np

REPLAY_STREAM = 1  # the replay memory's draws (pre-dfkd, memory-bank)
SAMPLER_STREAM = 2  # the collection indices the unlabeled method draws
SAMPLE_GRID_STREAM = 3  # the latents and replay samples of the report's sample grid


def stream_seed(seed: int, stream: int) -> int:
    """A seed for random stream `stream` of a run seeded with `seed`, statistically independent
    of the other streams (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0])
