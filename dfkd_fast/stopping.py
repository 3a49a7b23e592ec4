"""Stopping a distillation or a teacher's training cleanly on SIGINT (Ctrl-C) or SIGTERM (a
scheduler's or `timeout`'s kill): the step under way is finished, a checkpoint is written, and
:class:`RunStopped` is raised, so that `--resume` continues from that step, not from the last
periodic checkpoint."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(KeyboardInterrupt):
    """A run stopped by a signal after finishing its step `step` (or the `unit` it counts in), its
    state in `checkpoint`."""

    def __init__(self, signal_name: str, step: int, steps: int, checkpoint: Path,
                 unit: str = "step"):  # fmt: skip
        super().__init__(f"stopped by {signal_name} after {unit} {step} of {steps}; "
                         f"checkpoint: {checkpoint}")  # fmt: skip
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(signal.Signals[self.signal_name])


@contextlib.contextmanager
def deferred_stop_signals(enabled: bool = True) -> Iterator[Callable[[], str | None]]:
    """Yields a function that returns the name of the first SIGINT or SIGTERM received inside the
    block (None before one arrives). That first signal is only recorded; the previous handlers
    are put back at once, so a second signal acts as it would have (Ctrl-C twice stops at once),
    and on leaving the block in any case. Outside the main thread, where Python cannot set
    handlers, or when not `enabled`, signals act as usual and the function returns None."""
    received: list[str] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    # getsignal gives None for a handler that was not set from Python: the default stands in
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    previous = {number: signal.SIG_DFL if handler is None else handler
                for number, handler in previous.items()}  # fmt: skip

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def record(number, frame) -> None:
        received.append(signal.Signals(number).name)
        restore()

    for number in STOP_SIGNALS:
        signal.signal(number, record)
    try:
        yield lambda: received[0] if received else None
    finally:
        restore()
