"""Stock River forecasters (SNARIMAX, Holt-Winters) behind the loadcast protocol.

They are recursive: the ``h``-step forecast feeds on the model's own earlier steps, which
is why they degrade with the horizon and why ``"default"`` is a direct model instead.  They
are kept as comparison points.  The series is divided by a fixed scale (the first
non-zero observation) so River's SGD sees values of order one; missing steps are filled
with the model's own one-step forecast so River's lag buffers stay aligned.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from river import linear_model, optim, preprocessing, time_series

from processors.forecasting.bands import BandedForecaster

__all__ = ["RiverForecaster", "holt_winters", "snarimax"]


class RiverForecaster(BandedForecaster):
    """Wraps any River ``time_series`` forecaster (``learn_one(y)``, ``forecast(h)``)."""

    kind = "river"

    def __init__(
        self,
        model: Any,
        step_seconds: int,
        season_seconds: int = 86400,
        max_horizon: int = 15,
    ) -> None:
        super().__init__(step_seconds, season_seconds, max_horizon)
        self.model = model
        self._unit = math.nan  # fixed scale, set by the first non-zero value
        self._last = math.nan

    def _max_gap_fill(self) -> int:
        return self.season

    def _observe(self, value: float) -> None:
        if math.isnan(value):
            if math.isnan(self._unit):
                return
            guess = self._one_step()
            v = guess if math.isfinite(guess) else self._last / self._unit
        else:
            if math.isnan(self._unit) and value > 0:
                self._unit = value
            if math.isnan(self._unit):
                self._last = value
                return
            v = value / self._unit
            self._last = value
        self.model.learn_one(v)

    def _one_step(self) -> float:
        try:
            return float(self.model.forecast(1)[0])
        except Exception:  # River raises before it is initialised (e.g. Holt-Winters)
            return math.nan

    def _points(self, n: int) -> np.ndarray:
        if math.isnan(self._unit):
            return np.full(n, 0.0 if math.isnan(self._last) else self._last)
        try:
            raw = np.asarray(self.model.forecast(n), dtype=float) * self._unit
        except Exception:
            raw = np.full(n, np.nan)
        # Not initialised yet or diverged: the last value is the honest fallback.
        return np.where(np.isfinite(raw), raw, self._last)


def snarimax(
    step_seconds: int, season_seconds: int = 86400, max_horizon: int = 15
) -> RiverForecaster:
    """River SNARIMAX(p=2, d=0, q=1)(sp=1, sd=1, sq=0)_m on a seasonal difference."""
    m = max(1, round(season_seconds / step_seconds))
    regressor = preprocessing.StandardScaler() | linear_model.LinearRegression(
        optimizer=optim.SGD(0.005), intercept_lr=0.001, clip_gradient=1.0
    )
    model = time_series.SNARIMAX(p=2, d=0, q=1, m=m, sp=1, sd=1, sq=0, regressor=regressor)
    f = RiverForecaster(model, step_seconds, season_seconds, max_horizon)
    f.kind = "snarimax"
    return f


def holt_winters(
    step_seconds: int, season_seconds: int = 86400, max_horizon: int = 15
) -> RiverForecaster:
    """River additive Holt-Winters (alpha 0.3, beta 0.01, gamma 0.2) with a daily season."""
    m = max(2, round(season_seconds / step_seconds))
    model = time_series.HoltWinters(alpha=0.3, beta=0.01, gamma=0.2, seasonality=m)
    f = RiverForecaster(model, step_seconds, season_seconds, max_horizon)
    f.kind = "holtwinters"
    return f
