"""A fair comparison of two servers on a shared machine: the same CPUs for both, and the
CPU time each spent.

Wall requests/s on a machine shared with other work swing with whatever else runs; the
CPU seconds the server process itself spent per request do not (much). So the data-plane
benchmarks pin every server they compare to the same CPU (the load generator to the
others) and report, beside req/s, requests per CPU-second of the server process
(user + system time of all its threads, from ``/proc`` through psutil).

>>> s, g = split_cpus({0, 1})
>>> s, g
({1}, {0})
>>> split_cpus({3})
({3}, None)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import psutil


def split_cpus(cpus: set[int] | None = None) -> tuple[set[int], set[int] | None]:
    """(CPUs for the server under test, CPUs for the load generator or None to leave it
    free): the last allowed CPU for the server, the others for the load."""
    allowed = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(allowed) < 2:
        return set(allowed), None
    return {allowed[-1]}, set(allowed[:-1])


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (threads started later inherit)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` (all its threads) has used so far."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


@dataclass
class CpuUse:
    """CPU seconds a process used over a ``with`` block (set when the block ends)."""

    pid: int
    start: float = 0.0
    seconds: float = 0.0


@contextlib.contextmanager
def measured(pid: int) -> Iterator[CpuUse]:
    """CPU seconds process ``pid`` spends within the block (``.seconds`` after it)."""
    use = CpuUse(pid, cpu_seconds(pid))
    try:
        yield use
    finally:
        use.seconds = cpu_seconds(pid) - use.start


def per_cpu_second(requests: float, cpu_s: float) -> float:
    """Requests per CPU-second (0 when no CPU time was measured)."""
    return requests / cpu_s if cpu_s > 0 else 0.0
