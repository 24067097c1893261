"""Forecast-gated cache warming of keys already seen: which keys, when, how many. Pure.

This is not prediction of unseen responses: it refreshes an API's *most requested stored*
keys before they expire, and only while the forecast says demand will reach
``threshold`` x the API's capacity within the lead time (a capacity that is CONFIGURED or
confidently LEARNED; with none, the gate stays shut). Origin requests for it are bounded
by a budget per minute (a token bucket).

>>> f = KeyFrequency()
>>> for k in ["/a", "/b", "/a", "/c", "/a", "/b"]:
...     f.seen(k, 0.0)
>>> f.top(2)
['/a', '/b']
>>> gate_open(0.9, 0.8), gate_open(0.5, 0.8), gate_open(0.0, 0.8)
(True, False, False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class KeyFrequency:
    """Recent request counts per key, decaying with ``half_life_s``, at most ``max_keys``."""

    def __init__(self, half_life_s: float = 60.0, max_keys: int = 10_000) -> None:
        self.half_life_s = half_life_s
        self.max_keys = max_keys
        self.counts: dict[str, float] = {}
        self._t0: float | None = None

    def seen(self, key: str, now: float) -> None:
        """Count one request for ``key`` at ``now``."""
        if self._t0 is None:
            self._t0 = now
        # counts grow by 2^(t/half_life) instead of decaying all: O(1) per request
        w = 2.0 ** ((now - self._t0) / self.half_life_s)
        if w > 1e12:  # rebase before floats overflow
            self.counts = {k: v / w for k, v in self.counts.items()}
            self._t0, w = now, 1.0
        self.counts[key] = self.counts.get(key, 0.0) + w
        if len(self.counts) > self.max_keys:
            keep = sorted(self.counts.items(), key=lambda kv: kv[1])[len(self.counts) // 2:]
            self.counts = dict(keep)

    def top(self, k: int) -> list[str]:
        """The ``k`` most requested keys, most first."""
        return [key for key, _ in sorted(self.counts.items(), key=lambda kv: -kv[1])[:k]]


def gate_open(pressure: float, threshold: float) -> bool:
    """Warm now? ``pressure``: forecast demand over a known capacity within the lead time
    (0 when no capacity is known)."""
    return pressure > 0 and pressure >= threshold


def due(ttl_s: float, lead_s: float, age_s: float, lifetime_s: float) -> bool:
    """Refresh a stored key whose freshness runs out within ``lead_s`` (or already did),
    unless it was refreshed in the last half of its lifetime (refreshing it again would
    only spend origin requests: as late as possible before the spike is best).

    >>> due(5.0, 10.0, 55.0, 60.0), due(30.0, 10.0, 30.0, 60.0), due(8.0, 30.0, 2.0, 10.0)
    (True, False, False)
    """
    return ttl_s <= lead_s and age_s >= lifetime_s / 2


@dataclass
class Budget:
    """Origin requests per minute for warming (token bucket, burst = one minute's worth)."""

    per_min: float
    tokens: float = math.nan
    last: float = math.nan

    def take(self, now: float) -> bool:
        """Spend one origin request if the budget allows.

        >>> b = Budget(per_min=2)
        >>> [b.take(0.0) for _ in range(3)], b.take(30.0)
        ([True, True, False], True)
        """
        if math.isnan(self.tokens):
            self.tokens, self.last = self.per_min, now
        self.tokens = min(self.per_min, self.tokens + (now - self.last) * self.per_min / 60.0)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
