"""A guard the bad-input tests share: fail instead of hanging."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def deadline(seconds: int, error: type = TimeoutError, what: str = "the call") -> Iterator[None]:
    """Raise ``error`` when the block runs longer than ``seconds`` (SIGALRM interrupts even a blocking
    ``open()`` of a FIFO)."""
    def on_alarm(signum, frame):
        raise error(f"no answer within {seconds} s: {what} hangs")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
