"""Offered load over time: a seasonal ramp (or a replayed trace), spikes, arrivals.

The rate is piecewise constant on ``bin_s`` bins. Poisson arrivals are drawn bin by bin
(exponential gaps, redrawn at bin edges: exact for a piecewise-constant rate because the
exponential is memoryless); ``uniform`` arrivals are evenly spaced, like a load generator
that fires one request per millisecond.

>>> shape = LoadShape.constant(100.0, duration_s=2.0)
>>> import random
>>> gen = shape.arrivals(random.Random(1), "uniform")
>>> [round(next(gen), 3) for _ in range(3)]
[0.0, 0.01, 0.02]
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Spike:
    """Offered load multiplied by ``factor`` in [start, end) (sim seconds)."""

    start: float
    end: float
    factor: float


class LoadShape:
    """Requests per second per ``bin_s`` bin over ``[0, duration_s)``, plus the history
    before 0 (the same shape's earlier seasons) the forecasters are warmed up with."""

    def __init__(self, rates: np.ndarray, bin_s: float, history: np.ndarray | None = None,
                 source: str = "synthetic") -> None:
        if rates.ndim != 1 or rates.size == 0:
            raise ValueError("rates must be a non-empty 1-d array")
        if not np.all(np.isfinite(rates)) or np.any(rates < 0):
            raise ValueError("rates must be finite and >= 0")
        self.rates = rates.astype(float)
        self.bin_s = float(bin_s)
        self.history = (np.zeros(0) if history is None else history).astype(float)
        self.source = source

    @property
    def duration_s(self) -> float:
        return self.rates.size * self.bin_s

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def constant(cls, rps: float, duration_s: float, bin_s: float = 0.1) -> LoadShape:
        return cls(np.full(round(duration_s / bin_s), float(rps)), bin_s, source="constant")

    @classmethod
    def seasonal(cls, mean_rps: float, amplitude: float, duration_s: float,
                 history_seasons: int = 3, bin_s: float = 0.1, phase: float = 0.0) -> LoadShape:
        """A compressed day: ``mean * (1 - amplitude * cos(2 pi (t / duration + phase)))``;
        the run covers one season (trough, ramp up, peak, ramp down), and the history is
        ``history_seasons`` earlier seasons of the same shape."""
        n = round(duration_s / bin_s)
        t = np.arange(-history_seasons * n, n) * bin_s
        r = mean_rps * (1.0 - amplitude * np.cos(2 * math.pi * (t / duration_s + phase)))
        return cls(r[history_seasons * n:], bin_s, r[:history_seasons * n], "seasonal")

    @classmethod
    def from_trace(cls, path: Path, mean_rps: float, duration_s: float,
                   history_seasons: int = 3, bin_s: float = 0.1) -> LoadShape:
        """Replay a ``timestamp,value`` CSV compressed in time: the whole series is
        stretched over ``(history_seasons + 1) * duration_s``; the last ``duration_s`` is
        the run, the rest the history. Values are scaled so the run's mean is ``mean_rps``.
        """
        ts, ys = read_trace(path)
        n = round(duration_s / bin_s)
        total = (history_seasons + 1) * n
        x = (ts - ts[0]) / max(ts[-1] - ts[0], 1e-9) * (total - 1)
        r = np.interp(np.arange(total), x, ys)
        run = r[history_seasons * n:]
        scale = mean_rps / max(float(run.mean()), 1e-9)
        r = np.maximum(r * scale, 0.0)
        return cls(r[history_seasons * n:], bin_s, r[:history_seasons * n], f"trace:{path.name}")

    # -- use ------------------------------------------------------------------------------

    def with_spikes(self, spikes: list[Spike]) -> LoadShape:
        r = self.rates.copy()
        t = np.arange(r.size) * self.bin_s
        for s in spikes:
            r[(t >= s.start) & (t < s.end)] *= s.factor
        return LoadShape(r, self.bin_s, self.history, self.source)

    def rate_at(self, t: float) -> float:
        k = int(t / self.bin_s)
        return float(self.rates[k]) if 0 <= k < self.rates.size else 0.0

    def arrivals(self, rng: random.Random, kind: str = "poisson") -> Iterator[float]:
        """Arrival times in [0, duration) in order."""
        if kind not in ("poisson", "uniform"):
            raise ValueError(f"arrivals must be poisson or uniform, got {kind!r}")
        rates, dt = self.rates, self.bin_s
        t = 0.0
        if kind == "uniform":
            acc = 0.0  # fractional requests carried between bins
            for k, r in enumerate(rates):
                lo = k * dt
                acc += r * dt
                count = int(acc)
                acc -= count
                for i in range(count):
                    yield lo + i * dt / count
            return
        k = 0
        n = rates.size
        while k < n:
            r = rates[k]
            edge = (k + 1) * dt
            if r <= 0:
                t, k = edge, k + 1
                continue
            t += rng.expovariate(r)
            if t < edge:
                yield t
            else:
                t, k = edge, k + 1


def read_trace(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``timestamp,value`` CSV (ISO timestamps or epoch seconds) -> (seconds, values).

    Raises ValueError naming the line of the first bad row.
    """
    ts: list[float] = []
    ys: list[float] = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"timestamp", "value"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs a header with 'timestamp' and 'value' columns")
        for i, row in enumerate(reader, start=2):
            raw = row["timestamp"]
            try:
                t = float(raw)
            except ValueError:
                try:
                    t = datetime.fromisoformat(raw).replace(tzinfo=UTC).timestamp()
                except ValueError:
                    raise ValueError(f"{path}:{i}: bad timestamp {raw!r}") from None
            try:
                y = float(row["value"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{i}: bad value {row['value']!r}") from None
            if not math.isfinite(y) or y < 0:
                raise ValueError(f"{path}:{i}: value must be finite and >= 0, got {y}")
            ts.append(t)
            ys.append(y)
    if len(ts) < 2:
        raise ValueError(f"{path}: needs at least 2 rows")
    order = np.argsort(ts, kind="stable")
    return np.asarray(ts)[order], np.asarray(ys)[order]
