"""Ending a command cleanly: on SIGINT/SIGTERM, or after a set time."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def stop_on_signals(duration: float | None = None) -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, and after ``duration`` seconds when given, so loops
    end and clean up instead of dying. The previous handlers are restored on exit.

    >>> with stop_on_signals(duration=0.01) as stop:
    ...     stop.wait(5)
    True
    """
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    timer = None
    if duration is not None:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True  # a stop by signal must not wait for it
        timer.start()
    try:
        yield stop
    finally:
        if timer is not None:
            timer.cancel()
        for s, h in old.items():
            signal.signal(s, h)
