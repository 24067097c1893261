"""Online per-endpoint load forecasters.

>>> from processors.forecasting import make_forecaster
>>> f = make_forecaster("seasonal_naive", step_seconds=60, season_seconds=120)
>>> for i, v in enumerate([5.0, 7.0, 6.0]):
...     _ = f.learn(60 * i, v)
>>> [(p.horizon, p.mean) for p in f.forecast(2)]
[(1, 7.0), (2, 6.0)]
"""

from __future__ import annotations

from typing import Any

from processors.forecasting.base import BAND_COVERAGE, Forecaster, ForecastPoint
from processors.forecasting.baselines import Persistence, SeasonalNaive
from processors.forecasting.direct import DirectForecaster
from processors.forecasting.river_models import RiverForecaster, holt_winters, snarimax

__all__ = [
    "BAND_COVERAGE",
    "KINDS",
    "DirectForecaster",
    "ForecastPoint",
    "Forecaster",
    "Persistence",
    "RiverForecaster",
    "SeasonalNaive",
    "make_forecaster",
]

_FACTORIES: dict[str, Any] = {
    "default": DirectForecaster,
    "snarimax": snarimax,
    "holtwinters": holt_winters,
    "seasonal_naive": SeasonalNaive,
    "persistence": Persistence,
}
KINDS: tuple[str, ...] = tuple(_FACTORIES)


def make_forecaster(
    kind: str = "default",
    step_seconds: int = 60,
    season_seconds: int = 86400,
    max_horizon: int = 15,
    **options: Any,
) -> Forecaster:
    """Build a forecaster of ``kind`` (one of :data:`KINDS`).

    ``step_seconds`` is the model step (one ``learn`` per step), ``season_seconds`` the main
    seasonality (a day by default) and ``max_horizon`` the longest horizon tracked for
    accuracy and bands (longer forecasts are allowed, with wider bands).

    >>> make_forecaster("nope")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown forecaster kind 'nope'; valid kinds: default, snarimax, ...
    """
    try:
        factory = _FACTORIES[kind]
    except KeyError:
        raise ValueError(
            f"unknown forecaster kind {kind!r}; valid kinds: {', '.join(KINDS)}"
        ) from None
    forecaster: Forecaster = factory(
        step_seconds=step_seconds, season_seconds=season_seconds, max_horizon=max_horizon,
        **options,
    )
    return forecaster
