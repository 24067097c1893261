"""Shared machinery for online forecasters: step bookkeeping and empirical 90 % bands.

:class:`BandedForecaster` turns a subclass's point forecasts into :class:`ForecastPoint`
lists.  Each step it remembers the point forecast it made for the next ``max_horizon``
steps; when the actual arrives it records the error, divided by the series level so the
band is scale-free, in a per-horizon ring buffer.  The band is the empirical 5 % and 95 %
quantiles of those rings (a rolling quantile, not a Gaussian assumption), re-scaled by the
current level.  Bands beyond ``max_horizon`` widen with the square root of the horizon.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from processors.forecasting.base import ForecastPoint, StepClock, forecast_points

__all__ = ["BandedForecaster"]

_Q_LO, _Q_HI = 0.05, 0.95
_QS = np.array([_Q_LO, _Q_HI])
_MAX = float(np.finfo(np.float64).max)  # what np.nan_to_num turns +inf into


class BandedForecaster:
    """Base class: clock, gap handling, level tracking and rolling-quantile bands.

    Subclasses implement :meth:`_observe` (learn one step, ``value`` may be NaN for a gap)
    and :meth:`_points` (point forecasts for horizons ``1..n``).
    """

    kind = "base"

    def __init__(
        self,
        step_seconds: int,
        season_seconds: int = 86400,
        max_horizon: int = 15,
        band_window: int = 500,
        band_refresh: int = 4,
    ) -> None:
        if max_horizon < 1:
            raise ValueError("max_horizon must be >= 1")
        self.step_seconds = int(step_seconds)
        self.season_seconds = int(season_seconds)
        self.season = max(1, round(season_seconds / step_seconds))
        self.max_horizon = int(max_horizon)
        self._clock = StepClock(step_seconds)
        self._n = 0  # learned (non-gap) observations
        self._t = -1  # step index of the last step (gaps included)
        # Level: EW mean of |y| over about a season, the scale for scale-free errors.
        self._level_alpha = max(2.0 / (self.season + 1), 0.002)
        self._level = math.nan
        H, W = self.max_horizon, int(band_window)
        # Point forecasts made at step k live in row k % H, with the level at k.
        self._pend = np.full((H, H), np.nan)
        self._pend_level = np.full(H, np.nan)
        self._pend_step = np.full(H, -(10**9), dtype=np.int64)
        self._errs = np.full((H, W), np.nan, dtype=np.float32)  # scaled errors (ring)
        self._err_pos = np.zeros(H, dtype=np.int64)
        self._err_n = np.zeros(H, dtype=np.int64)
        self._band_refresh = max(1, int(band_refresh))
        self._q = np.zeros((2, H))  # cached (lower, upper) scaled quantiles
        self._q_age = 10**9
        self._cur = np.zeros(H)  # point forecasts for the next H steps
        self._hs = np.arange(1, H + 1)

    # -- protocol ---------------------------------------------------------------------
    @property
    def observations(self) -> int:
        return self._n

    @property
    def last_ts(self) -> float | None:
        return self._clock.last_ts

    def learn(self, ts: float, value: float) -> bool:
        """Learn one step.  A ``ts`` several steps after the last one leaves a gap (the
        missing steps are learned as unknown, not as zero); a ``ts`` not after the last
        one is ignored and returns False.  Non-finite or negative values count as gaps.
        """
        steps = self._clock.advance(ts)
        if steps <= 0:
            return False
        value = float(value)
        if not math.isfinite(value) or value < 0:
            value = math.nan
        # Gaps: at most a long history's worth of missing steps matters.
        # Missing steps are observed as unknown (NaN) so histories stay aligned; no
        # forecasts are recorded for them.
        for _ in range(min(steps - 1, self._max_gap_fill())):
            self._t += 1
            self._observe(math.nan)
        self._t += steps - 1 - min(steps - 1, self._max_gap_fill())
        self._t += 1
        if not math.isnan(value):
            self._n += 1
            lv = self._level
            self._level = value if math.isnan(lv) else lv + self._level_alpha * (value - lv)
        self._observe(value)
        self._after_step(value)
        return True

    def forecast(self, horizon: int = 15) -> list[ForecastPoint]:
        """Forecast ``horizon`` steps after :attr:`last_ts` (mean and 90 % band, >= 0)."""
        if horizon < 1:
            return []
        H = self.max_horizon
        # Plain floats from here on: numpy's per-element overhead dominates on 15 points.
        means: list[float]
        if self._n == 0:  # nothing learned yet: zeros (with the default band)
            means = [0.0] * horizon
        elif horizon <= H:
            means = self._cur[:horizon].tolist()
        else:
            means = np.concatenate([self._cur, self._points(horizon)[H:]]).tolist()
        q_lo, q_hi = self._quantiles().tolist()
        level = self._level if math.isfinite(self._level) else 0.0
        lowers, uppers = [], []
        for i, m in enumerate(means):
            h = i + 1
            if h <= H:
                lo, hi = q_lo[i], q_hi[i]
            else:  # random-walk-like widening past the tracked horizons
                f = math.sqrt(h / H)
                lo, hi = q_lo[H - 1] * f, q_hi[H - 1] * f
            lowers.append(m + lo * level)
            uppers.append(m + hi * level)
        return forecast_points(self._clock, means, lowers, uppers)

    # -- for subclasses ---------------------------------------------------------------
    def _observe(self, value: float) -> None:
        raise NotImplementedError

    def _points(self, n: int) -> np.ndarray:
        raise NotImplementedError

    def _max_gap_fill(self) -> int:
        return self.season + self.max_horizon

    def _scale(self) -> float:
        lv = self._level
        return lv if math.isfinite(lv) and lv > 1e-9 else 1e-9

    # -- internals --------------------------------------------------------------------
    def _after_step(self, value: float) -> None:
        H, t = self.max_horizon, self._t
        if not math.isnan(value):
            self._record_errors(value, t)
        if self._n == 0:
            self._cur = np.zeros(H)
            return
        # Non-finite point forecasts count as 0 (np.nan_to_num does the same, but is a
        # Python-level function costing more than these three ufunc calls together).
        pts = self._points(H)
        cur = np.where(np.isfinite(pts), pts, 0.0)
        np.maximum(cur, 0.0, out=cur)
        self._cur = cur
        r = t % H
        self._pend[r] = cur
        self._pend_level[r] = self._scale()
        self._pend_step[r] = t

    def _record_errors(self, value: float, t: int) -> None:
        """Scaled error of every earlier forecast that ``value`` (step ``t``) completes."""
        H, hs = self.max_horizon, self._hs
        made = t - hs  # step at which horizon h's forecast of step t was made
        rows = made % H
        # Slots never written (or of gaps) hold NaN or stale forecasts: masked by ok.
        e = (value - self._pend[rows, hs - 1]) / self._pend_level[rows]
        ok = (self._pend_step[rows] == made) & np.isfinite(e)
        if ok.all():  # the usual case: every horizon completes; no index arrays needed
            pos = self._err_pos
            self._errs[hs - 1, pos] = e
            pos += 1
            pos %= self._errs.shape[1]
            self._err_n += 1
        elif ok.any():
            idx = np.flatnonzero(ok)
            pos = self._err_pos[idx]
            self._errs[idx, pos] = e[idx]
            self._err_pos[idx] = (pos + 1) % self._errs.shape[1]
            self._err_n[idx] += 1
        else:
            return
        self._q_age += 1

    def _quantiles(self) -> np.ndarray:
        if self._q_age >= self._band_refresh:
            self._q_age = 0
            if self._err_n.any():
                q = self._ring_quantiles()
                # np.nan_to_num(q, nan=0.0) in fewer calls: +-inf -> +-max, an empty ring's
                # NaN -> 0 (no errors yet).
                np.maximum(q, -_MAX, out=q)
                np.minimum(q, _MAX, out=q)
                np.copyto(q, 0.0, where=np.isnan(q))
            else:
                q = np.zeros((2, self.max_horizon))
            # Too few errors yet: keep a modest default band rather than a zero-width one.
            # Never a band that excludes the point forecast.
            few = self._err_n < 20
            q[0] = np.minimum(q[0], np.where(few, -0.5, 0.0))
            q[1] = np.maximum(q[1], np.where(few, 0.5, 0.0))
            self._q = q
        return self._q

    def _ring_quantiles(self) -> np.ndarray:
        """(2, H): the 5 % and 95 % quantiles of each horizon's error ring, empty (NaN)
        slots ignored, NaN for an empty ring.

        Bit for bit ``np.nanquantile(errs, (0.05, 0.95), axis=1)`` with numpy's default
        'linear' method, but vectorized: nanquantile runs a Python-level quantile per row
        (``apply_along_axis``) while any ring has empty slots, ~0.8 ms a call.  Each row is
        sorted (NaN last) and interpolated at ``(n - 1) * q`` for its own count ``n``.
        """
        errs, H = self._errs, self.max_horizon
        W = errs.shape[1]
        # Rings fill from slot 0, so slots past the fullest ring's count are all empty.
        k = min(W, int(self._err_n.max()))
        srt = np.sort(errs[:, :k], axis=1)  # float32 like the rings: a cheaper sort
        # Only finite errors are recorded (NaN marks an empty slot): n = min(count, W).
        last = np.minimum(self._err_n, W) - 1  # index of the largest value, n - 1
        # As numpy's _quantile: virtual index, its neighbours (both the largest value when
        # the index reaches it, i.e. n == 1; an empty ring reads NaN from its last slot)
        # and gamma.
        virtual = _QS[:, None] * last[None, :]
        below = np.floor(virtual)
        top = virtual >= last
        i0 = np.where(top, last, below).astype(np.intp)
        i1 = np.where(top, last, below + 1).astype(np.intp)
        gamma = virtual - np.where(top, -1.0, below)
        cols = np.arange(H)
        a = srt[cols, i0].astype(np.float64)
        b = srt[cols, i1].astype(np.float64)
        # numpy's _lerp: from the nearer end, so gamma 0 and 1 give a and b exactly.
        with np.errstate(invalid="ignore"):  # inf - inf (float32 overflow) gives NaN
            diff = b - a
            q = a + diff * gamma
            np.subtract(b, diff * (1 - gamma), out=q, where=gamma >= 0.5)
        return q

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()
