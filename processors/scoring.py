"""LoadScore: how much more traffic an endpoint can take, ahead of time (higher = send more).

Formula (every factor is in [0, 1]; the score is their product)::

    C       = capacity_rps (configured, learned from the latency knee, or a default)
    u_pred  = max_h forecast[h].mean / C              (predicted_utilization in the record)
    u_risk  = max_h forecast[h].upper / C             (the 90 % band's upper edge)
    u_now   = current_rps / C
    u       = max(u_now, u_pred + risk_weight * (u_risk - u_pred))
    load    = clip(1 - u ** 2, 0, 1)                  (gentle at low load, 0 at saturation)
    errors  = exp(-error_rate / error_scale)          (5 % errors -> 0.37 with scale 0.05)
    latency = min(1, latency_slo_ms / latency_p99_ms) (1 while p99 is within the SLO)
    anomaly = 1 - anomaly_weight * anomaly_score      (and x anomaly_penalty if flagged)
    score   = clip(load * errors * latency * anomaly, 0, 1)

So more predicted load, more errors, higher latency or an anomaly never raise the score.
Reasons name each factor that pulled the score down noticeably.

Capacity is learned by :class:`CapacityEstimator` from where latency starts to climb with
the rate (the knee); until it has seen a knee, a configured value wins, else a default.

>>> from processors.forecasting import ForecastPoint
>>> fc = [ForecastPoint(h, 60.0 * h, 50.0, 40.0, 60.0) for h in (1, 2)]
>>> r = compute_score(fc, capacity_rps=100, current_rps=45, latency_p99_ms=80, error_rate=0)
>>> round(r.score, 3), round(r.predicted_utilization, 2)
(0.698, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from processors.forecasting.base import ForecastPoint

__all__ = [
    "CapacityEstimate",
    "CapacityEstimator",
    "ScoreBreakdown",
    "ScorePolicy",
    "compute_score",
    "forecast_peaks",
    "load_score_record",
]

CAPACITY_SOURCES = ("CONFIGURED", "LEARNED", "DEFAULT")


@dataclass(frozen=True, slots=True)
class ScorePolicy:
    """Tunables of the score formula (see the module docstring)."""

    risk_weight: float = 0.5  # how much of the band's upper edge counts as load
    error_scale: float = 0.05
    latency_slo_ms: float = 500.0
    anomaly_weight: float = 0.5
    anomaly_penalty: float = 0.5  # extra factor when the detector flags the window
    valid_steps: float = 2.0  # a score is valid for this many model steps
    reason_below: float = 0.9  # a factor under this is reported as a reason


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    """The score and the factors it is made of."""

    score: float
    predicted_utilization: float
    utilization: float  # the effective u of the formula
    factors: dict[str, float]
    reasons: list[str]


def _clip01(x: float) -> float:
    return 0.0 if not math.isfinite(x) or x < 0 else min(x, 1.0)


def _nonneg(x: float) -> float:
    return x if math.isfinite(x) and x > 0 else 0.0


def forecast_peaks(forecast: Sequence[ForecastPoint]) -> tuple[float, float]:
    """(highest mean, highest upper band edge) over the horizon, both >= 0."""
    peak_mean = max((_nonneg(p.mean) for p in forecast), default=0.0)
    peak_upper = max((_nonneg(p.upper) for p in forecast), default=0.0)
    return peak_mean, max(peak_upper, peak_mean)


def compute_score(
    forecast: Sequence[ForecastPoint],
    *,
    capacity_rps: float,
    current_rps: float,
    latency_p99_ms: float,
    error_rate: float,
    anomaly_score: float = 0.0,
    anomalous: bool = False,
    policy: ScorePolicy | None = None,
    peaks: tuple[float, float] | None = None,
    explain: bool = True,
) -> ScoreBreakdown:
    """Score one endpoint (pure).  See the module docstring for the formula.

    ``peaks`` = :func:`forecast_peaks` of ``forecast``, for callers that score many windows
    against one forecast (the formula only needs the peaks). ``explain=False`` leaves
    ``reasons`` empty: the processor scores every window but publishes few of them, and
    formatting the reasons cost as much as the formula.
    """
    pol = policy or ScorePolicy()
    cap = capacity_rps if math.isfinite(capacity_rps) and capacity_rps > 0 else 1e-9
    peak_mean, peak_upper = peaks if peaks is not None else forecast_peaks(forecast)
    u_now = _nonneg(current_rps) / cap
    u_pred = peak_mean / cap
    u_risk = peak_upper / cap
    u = max(u_now, u_pred + pol.risk_weight * (u_risk - u_pred))
    err = _clip01(error_rate)
    p99 = _nonneg(latency_p99_ms)
    a = _clip01(anomaly_score)
    factors = {
        "load": _clip01(1.0 - u * u),
        "errors": math.exp(-err / pol.error_scale) if pol.error_scale > 0 else 1.0,
        "latency": 1.0 if p99 <= pol.latency_slo_ms else pol.latency_slo_ms / p99,
        "anomaly": _clip01(1.0 - pol.anomaly_weight * a)
        * (pol.anomaly_penalty if anomalous else 1.0),
    }
    score = _clip01(math.prod(factors.values()))
    reasons: list[str] = []
    if not explain:
        return ScoreBreakdown(score, u_pred, u, factors, reasons)
    if factors["load"] < pol.reason_below:
        which = "current" if u_now >= u_pred else "predicted"
        reasons.append(f"{which} utilization {u:.2f} of {cap:.4g} rps capacity")
    if factors["errors"] < pol.reason_below:
        reasons.append(f"error rate {err:.1%}")
    if factors["latency"] < pol.reason_below:
        reasons.append(f"p99 latency {p99:.0f} ms over the {pol.latency_slo_ms:.0f} ms SLO")
    if factors["anomaly"] < pol.reason_below:
        reasons.append(f"anomalous telemetry (score {a:.2f})")
    return ScoreBreakdown(score, u_pred, u, factors, reasons)


def load_score_record(
    *,
    endpoint_id: str,
    api: str,
    region: str,
    computed_at: float,
    step_seconds: int,
    forecast: Sequence[ForecastPoint],
    capacity: CapacityEstimate,
    current_rps: float,
    latency_p99_ms: float,
    error_rate: float,
    anomaly_score: float = 0.0,
    anomalous: bool = False,
    model: str = "default",
    policy: ScorePolicy | None = None,
) -> dict[str, Any]:
    """The ``loadcast.LoadScore`` Avro dict (``computed_at`` in epoch seconds in, epoch
    milliseconds out; ``valid_until`` = computed_at + ``policy.valid_steps`` steps).

    >>> from processors.forecasting import ForecastPoint
    >>> rec = load_score_record(endpoint_id="e1", api="a", region="eu", computed_at=600.0,
    ...     step_seconds=60, forecast=[ForecastPoint(1, 660.0, 5.0, 4.0, 6.0)],
    ...     capacity=CapacityEstimate(100.0, "CONFIGURED"), current_rps=5.0,
    ...     latency_p99_ms=20.0, error_rate=0.0)
    >>> rec["valid_until"], rec["capacity_source"], rec["forecast"][0]["at"]
    (720000, 'CONFIGURED', 660000)
    """
    pol = policy or ScorePolicy()
    b = compute_score(
        forecast,
        capacity_rps=capacity.rps,
        current_rps=current_rps,
        latency_p99_ms=latency_p99_ms,
        error_rate=error_rate,
        anomaly_score=anomaly_score,
        anomalous=anomalous,
        policy=pol,
    )
    reasons = list(b.reasons)
    if capacity.source == "DEFAULT" and b.factors["load"] < pol.reason_below:
        reasons.append("capacity is a default guess")
    computed_ms = round(computed_at * 1000)
    return {
        "endpoint_id": endpoint_id,
        "api": api,
        "region": region,
        "computed_at": computed_ms,
        "valid_until": computed_ms + round(pol.valid_steps * step_seconds * 1000),
        "score": float(b.score),
        "capacity_rps": float(_nonneg(capacity.rps)),
        "capacity_source": capacity.source,
        "current_rps": float(_nonneg(current_rps)),
        "predicted_utilization": float(b.predicted_utilization),
        "latency_p99_ms": float(_nonneg(latency_p99_ms)),
        "error_rate": float(_clip01(error_rate)),
        "anomaly_score": float(_clip01(anomaly_score)),
        "step_seconds": int(step_seconds),
        "forecast": [p.to_record() for p in forecast],
        "model": model,
        "reasons": reasons,
    }


# -- capacity -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapacityEstimate:
    rps: float
    source: str  # CONFIGURED, LEARNED or DEFAULT

    def __post_init__(self) -> None:
        if self.source not in CAPACITY_SOURCES:
            raise ValueError(f"capacity source must be one of {CAPACITY_SOURCES}")


@dataclass
class CapacityEstimator:
    """Learns an endpoint's capacity from where p99 latency starts to climb with the rate.

    Rates go into geometric bins (``bins_per_octave`` per doubling); each bin keeps an EW
    mean of p99.  The baseline is the median p99 of the lowest-rate populated bins; the
    knee is the first populated bin above them whose p99 exceeds ``climb`` x baseline and
    whose next populated bin does too (one noisy bin is not a knee).  Capacity is the
    lower edge of the knee bin.  Without a knee: the configured capacity if any, else
    ``max(default_rps, headroom x highest rate seen)`` (it took that rate without a climb).

    >>> est = CapacityEstimator(default_rps=50.0)
    >>> for rate in [1, 2, 4, 8, 16, 32, 64, 128] * 10:
    ...     est.update(rate, 20.0 if rate < 60 else 20.0 + rate)
    >>> e = est.estimate()
    >>> e.source, 45 <= e.rps <= 64
    ('LEARNED', True)
    """

    default_rps: float = 100.0
    configured_rps: float | None = None
    climb: float = 1.5
    min_samples: int = 5
    bins_per_octave: int = 4
    headroom: float = 1.25
    min_rate: float = 0.01
    n_bins: int = 112  # 28 octaves above min_rate: 0.01 rps .. ~2.7 M rps
    alpha: float = 0.1
    _p99: np.ndarray = field(init=False, repr=False)
    _n: np.ndarray = field(init=False, repr=False)
    _max_rate: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._p99 = np.zeros(self.n_bins)
        self._n = np.zeros(self.n_bins, dtype=np.int64)

    def _bin(self, rate: float) -> int:
        k = math.floor(math.log2(rate / self.min_rate) * self.bins_per_octave)
        return min(max(k, 0), self.n_bins - 1)

    def _edge(self, k: int) -> float:
        return float(self.min_rate * 2.0 ** (k / self.bins_per_octave))

    def update(self, rate_rps: float, latency_p99_ms: float) -> None:
        """Record one (rate, p99) observation; zero or invalid rates are ignored."""
        if not (math.isfinite(rate_rps) and math.isfinite(latency_p99_ms)):
            return
        if rate_rps <= self.min_rate or latency_p99_ms <= 0:
            return
        k = self._bin(rate_rps)
        n = self._n[k]
        self._p99[k] = latency_p99_ms if n == 0 else self._p99[k] + self.alpha * (
            latency_p99_ms - self._p99[k]
        )
        self._n[k] = n + 1
        self._max_rate = max(self._max_rate, rate_rps)

    def knee_rps(self) -> float | None:
        """The learned capacity, or None while no knee has been seen."""
        bins = np.nonzero(self._n >= self.min_samples)[0]
        if bins.size < 4:
            return None
        lat = self._p99[bins]
        base = float(np.median(lat[:3]))
        high = lat > self.climb * base
        for i in range(3, bins.size):
            if high[i] and (i + 1 >= bins.size or high[i + 1]):
                return self._edge(int(bins[i]))
        return None

    def estimate(self) -> CapacityEstimate:
        """Capacity with its source: LEARNED knee, else CONFIGURED, else DEFAULT."""
        knee = self.knee_rps()
        if knee is not None:
            return CapacityEstimate(knee, "LEARNED")
        if self.configured_rps is not None and self.configured_rps > 0:
            return CapacityEstimate(float(self.configured_rps), "CONFIGURED")
        return CapacityEstimate(max(self.default_rps, self.headroom * self._max_rate), "DEFAULT")
