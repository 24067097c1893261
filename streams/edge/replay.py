"""Replay a ``timestamp,value`` trace (like ``streams/traces/``) as per-endpoint requests.

Each row says how many requests arrived in one step (the gap to the next timestamp). The
replayer spreads each row's requests evenly over the step, splits them among the given
endpoints (as evenly as integers allow: the per-window sum equals the row), gives each a
latency from a seeded model, feeds them to an aggregator's ``record`` in event time, and
closes windows at the end of every row. ``speedup`` paces it against the wall clock
(``speedup=60``: an hour of trace in a minute; 0: as fast as possible).
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from schemas.codec import Record

#: The traces that ship with loadcast (NAB, MIT licence): the default of the demo, the
#: tests, the benchmarks and ``loadcast agent --replay``.
TRACES = Path(__file__).resolve().parents[1] / "traces"  # streams/traces
ELB_TRACE = "elb_request_count_8c0756.csv"
NYC_TRACE = "nyc_taxi.csv"


def data_dir() -> Path:
    """Where trace names are looked up: ``$LOADCAST_DATA_DIR``, else the shipped traces.

    >>> (data_dir() / ELB_TRACE).name
    'elb_request_count_8c0756.csv'
    """
    env = os.environ.get("LOADCAST_DATA_DIR")
    return Path(env) if env else TRACES


def trace_path(name: str | Path) -> Path:
    """``name`` as given if that file exists, else looked up in :func:`data_dir`.

    So ``--replay elb_request_count_8c0756.csv`` works from any folder.

    >>> trace_path(ELB_TRACE).exists()
    True
    """
    path = Path(name)
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    return data_dir() / path


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True)
class Trace:
    """Rows of (epoch seconds, requests in the step) and the step length in seconds."""

    rows: list[tuple[float, float]]
    step_seconds: float

    @property
    def total(self) -> float:
        return sum(v for _, v in self.rows)


def _parse_ts(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def read_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Read a ``timestamp,value`` CSV (ISO or epoch timestamps, header required).

    A bare file name is looked up in :func:`data_dir` (see :func:`trace_path`).
    """
    path = trace_path(path)
    rows: list[tuple[float, float]] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"timestamp", "value"} <= set(reader.fieldnames):
                raise TraceError(f"{path}: header must have 'timestamp' and 'value' columns")
            for line, row in enumerate(reader, start=2):
                try:
                    ts, value = _parse_ts(row["timestamp"]), float(row["value"])
                except (ValueError, TypeError) as e:
                    raise TraceError(f"{path}:{line}: {e}") from None
                if not math.isfinite(value) or value < 0:
                    raise TraceError(f"{path}:{line}: value must be a count >= 0, got {value}")
                if rows and ts <= rows[-1][0]:
                    raise TraceError(f"{path}:{line}: timestamps must increase")
                rows.append((ts, value))
                if limit is not None and len(rows) >= limit:
                    break
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    if len(rows) < 2:
        raise TraceError(f"{path}: needs at least two rows to know the step")
    steps = sorted(b[0] - a[0] for a, b in itertools.pairwise(rows))
    return Trace(rows, steps[len(steps) // 2])


def retime(trace: Trace, speedup: float, now: float | None = None) -> Trace:
    """``trace`` shifted in time so that a replay started ``now`` at ``speedup`` ends now:
    its last step closes when the replay finishes (at speedup 0, flat out, at ``now``).

    Stamps never lie ahead of the wall clock during the replay; below speedup 1 the
    trace is shifted to *start* now instead (ending now would stamp windows in the
    future). The shift is a whole number of steps, so windows keep the trace's alignment.

    >>> t = Trace([(0.0, 5.0), (300.0, 7.0)], 300.0)
    >>> retime(t, 600, now=100_000.0).rows   # 600 s of trace take 1 s: ends by 100_001
    [(99300.0, 5.0), (99600.0, 7.0)]
    >>> retime(t, 0.5, now=100_000.0).rows[0][0]   # slower than real time: starts now
    99900.0
    """
    now = time.time() if now is None else now
    t0, end = trace.rows[0][0], trace.rows[-1][0] + trace.step_seconds
    if speedup >= 1 or speedup == 0:
        target_end = now + ((end - t0) / speedup if speedup else 0.0)
        shift = target_end - end
    else:
        shift = now - t0
    shift = math.floor(shift / trace.step_seconds) * trace.step_seconds
    return Trace([(ts + shift, v) for ts, v in trace.rows], trace.step_seconds)


def window_offset(trace: Trace, interval_seconds: float) -> float:
    """Window alignment that makes windows start where the trace's rows start."""
    return trace.rows[0][0] % interval_seconds


def split_evenly(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` integers that differ by at most one and sum to ``n``."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class LatencyModel:
    """Seeded latencies: log-normal around ``base_ms``, a few 4xx/5xx."""

    def __init__(self, seed: int = 7, base_ms: float = 40.0, error_rate: float = 0.005) -> None:
        self.rng = random.Random(seed)
        self.mu = math.log(base_ms)
        self.error_rate = error_rate

    def __call__(self) -> tuple[float, int]:
        latency = self.rng.lognormvariate(self.mu, 0.5)
        u = self.rng.random()
        status = 500 if u < self.error_rate else 404 if u < 2 * self.error_rate else 200
        return latency, status


Record_fn = Callable[..., None]


def replay(
    trace: Trace,
    record: Record_fn,
    close: Callable[[float], object],
    endpoints: Sequence[str],
    *,
    api: str = "default",
    speedup: float = 0.0,
    scale: float = 1.0,
    latency: Callable[[], tuple[float, int]] | None = None,
    stop: threading.Event | None = None,
    on_row: Callable[[int, float, int], None] | None = None,
) -> int:
    """Replay ``trace`` into ``record``; ``close(t)`` is called at the end of every row.

    Returns the number of requests replayed. ``scale`` multiplies every row's value
    (e.g. 0.01 for a trace with millions of requests per step).
    """
    if not endpoints:
        raise ValueError("replay needs at least one endpoint")
    latency = latency or LatencyModel()
    step = trace.step_seconds
    t0 = trace.rows[0][0]
    wall0 = time.monotonic()
    total = 0
    for i, (ts, value) in enumerate(trace.rows):
        if stop is not None and stop.is_set():
            break
        if speedup > 0:
            delay = wall0 + (ts - t0) / speedup - time.monotonic()
            if delay > 0:
                if stop is None:
                    time.sleep(delay)
                elif stop.wait(delay):
                    break
        n = round(value * scale)
        for endpoint, count in zip(endpoints, split_evenly(n, len(endpoints)), strict=True):
            for k in range(count):
                ms, status = latency()
                record(endpoint, ms, status, api=api, at=ts + (k + 0.5) * step / count)
        total += n
        close(ts + step)
        if on_row is not None:
            on_row(i, ts, n)
    return total


def window_counts(records: Sequence[Record]) -> dict[int, int]:
    """Sum of request_count per window_start (ms), over all endpoints."""
    out: dict[int, int] = {}
    for r in records:
        out[r["window_start"]] = out.get(r["window_start"], 0) + r["request_count"]
    return out
