"""Baselines every forecast is compared with: persistence and seasonal-naive."""

from __future__ import annotations

import math

import numpy as np

from processors.forecasting.bands import BandedForecaster

__all__ = ["Persistence", "SeasonalNaive"]


class Persistence(BandedForecaster):
    """Tomorrow looks like now: every horizon forecasts the last observed value.

    >>> f = Persistence(step_seconds=60)
    >>> f.learn(0, 3.0), f.learn(60, 5.0)
    (True, True)
    >>> [p.mean for p in f.forecast(2)]
    [5.0, 5.0]
    """

    kind = "persistence"

    def __init__(self, step_seconds: int, season_seconds: int = 86400, max_horizon: int = 15):
        super().__init__(step_seconds, season_seconds, max_horizon)
        self._last = math.nan

    def _observe(self, value: float) -> None:
        if not math.isnan(value):
            self._last = value

    def _points(self, n: int) -> np.ndarray:
        return np.full(n, self._last)


class SeasonalNaive(BandedForecaster):
    """Step ``t + h`` looks like the same step one season earlier.

    Before a full season (or across a gap) the missing value falls back to the last
    observation.

    >>> f = SeasonalNaive(step_seconds=60, season_seconds=180)
    >>> for i, v in enumerate([1.0, 2.0, 3.0]):
    ...     _ = f.learn(60 * i, v)
    >>> [p.mean for p in f.forecast(4)]
    [1.0, 2.0, 3.0, 1.0]
    """

    kind = "seasonal_naive"

    def __init__(self, step_seconds: int, season_seconds: int = 86400, max_horizon: int = 15):
        super().__init__(step_seconds, season_seconds, max_horizon)
        self._hist = np.full(self.season, np.nan)
        self._last = math.nan

    def _max_gap_fill(self) -> int:
        return self.season

    def _observe(self, value: float) -> None:
        self._hist[self._t % self.season] = value
        if not math.isnan(value):
            self._last = value

    def _points(self, n: int) -> np.ndarray:
        m = self.season
        hs = np.arange(1, n + 1)
        lag = m * np.ceil(hs / m).astype(np.int64)
        out = self._hist[(self._t + hs - lag) % m]
        return np.where(np.isnan(out), self._last, out)
