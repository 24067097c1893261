"""Adaptive per-client rate limits: token buckets whose rate follows forecast headroom.

Pure (times passed in). Every client key has a token bucket of ``rate`` tokens/s and
``burst`` tokens; a request takes one. The rate of a client is

    base x factor,   factor = 1 while the forecast leaves headroom >= ``headroom_threshold``,

and when the forecast says capacity will run out (headroom below the threshold) the
*heaviest* clients (recent rate >= ``heavy_share`` x the mean client's) get
``max(min_factor, headroom / headroom_threshold)`` and *anomalous* clients (recent rate >=
``anomaly_factor`` x their own long-term rate) get ``min_factor``: they are limited first.
Light clients keep the base rate. When headroom comes back, every factor returns to 1.

``base`` is a configured rate per client, or ``per_client_share`` x the API's capacity when
that capacity is CONFIGURED or confidently LEARNED; with neither, nothing is limited:
traffic is never dropped on a guessed number (:func:`base_rate`).

Client keys arrive already hashed (:func:`client_digest`): a raw API key or address is
never kept or logged. At most ``max_clients`` buckets are kept (least recently seen go).

>>> lim = RateLimiter(RateRule(burst_s=1.0))
>>> [lim.take(b"k", now=0.0, base=2.0).allowed for _ in range(3)]
[True, True, False]
>>> lim.take(b"k", now=0.5, base=2.0).allowed      # half a second refills one token
True
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

_SALT = os.urandom(16)  # per process: digests cannot be compared across restarts


@functools.lru_cache(maxsize=4096)  # the same clients come back: hash each once
def client_digest(key: str) -> bytes:
    """A salted 8-byte digest of a client key (what buckets and logs use)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8,
                           key=_SALT).digest()


@dataclass(frozen=True)
class RateRule:
    """How the per-client rate follows headroom (see the module docstring)."""

    burst_s: float = 1.0  # bucket size in seconds of the client's rate (at least 1 token)
    headroom_threshold: float = 0.2
    min_factor: float = 0.25
    heavy_share: float = 2.0
    anomaly_factor: float = 5.0
    short_tau_s: float = 5.0  # a client's recent rate (EWMA time constant)
    long_tau_s: float = 120.0  # its own history
    max_clients: int = 10_000

    def factor(self, headroom: float, heavy: bool, anomalous: bool) -> float:
        """Multiplier of the base rate for one client.

        >>> r = RateRule()
        >>> r.factor(0.5, True, False), r.factor(0.1, False, False), r.factor(0.1, True, False)
        (1.0, 1.0, 0.5)
        >>> r.factor(-0.3, True, False), r.factor(0.1, False, True)
        (0.25, 0.25)
        """
        if headroom >= self.headroom_threshold:
            return 1.0
        if anomalous:
            return self.min_factor
        if heavy:
            return max(self.min_factor, max(0.0, headroom) / self.headroom_threshold)
        return 1.0


def base_rate(configured_rps: float | None, per_client_share: float | None,
              capacity_rps: float | None) -> float | None:
    """Per-client base rate: the configured one, else a share of a known capacity, else
    None (do not limit).

    >>> base_rate(None, 0.1, None) is None, base_rate(None, 0.1, 500.0), base_rate(20.0, 0.1, 500.0)
    (True, 50.0, 20.0)
    """
    if configured_rps is not None:
        return configured_rps
    if per_client_share is not None and capacity_rps is not None and capacity_rps > 0:
        return per_client_share * capacity_rps
    return None


def headroom(pressure: float) -> float:
    """Forecast headroom from forecast demand over capacity (0 = unknown: full headroom)."""
    return 1.0 - pressure


@dataclass
class Client:
    """One client's bucket and rate history."""

    tokens: float
    last: float
    short_rate: float = 0.0  # requests/s, EWMA over short_tau_s
    long_rate: float = 0.0  # requests/s, EWMA over long_tau_s
    since: float = 0.0


class Decision(NamedTuple):
    """The answer for one request: allowed or not, and the RateLimit-* header values (a
    tuple: one is made per request)."""

    allowed: bool
    limit: float  # tokens/s now in force for this client
    remaining: int
    reset_s: float  # until the bucket is full again
    retry_after_s: float  # until one token is there (0 when allowed)
    factor: float


class RateLimiter:
    """Token buckets of one API's clients."""

    def __init__(self, rule: RateRule) -> None:
        self.rule = rule
        self.clients: OrderedDict[bytes, Client] = OrderedDict()
        self.mean_rate = 0.0  # mean short rate over clients (from :meth:`refresh`)
        self.headroom = 1.0
        self.limited = 0

    def refresh(self, headroom: float) -> None:
        """Take the current forecast headroom and recompute the mean client rate (call
        periodically, not per request)."""
        self.headroom = headroom
        n = len(self.clients)
        self.mean_rate = sum(c.short_rate for c in self.clients.values()) / n if n else 0.0

    def classify(self, c: Client, now: float) -> tuple[bool, bool]:
        """(heavy, anomalous) for one client."""
        r = self.rule
        heavy = self.mean_rate > 0 and c.short_rate >= r.heavy_share * self.mean_rate
        seasoned = now - c.since >= r.short_tau_s * 2
        anomalous = seasoned and c.short_rate >= r.anomaly_factor * max(c.long_rate, 1e-9) \
            and c.short_rate > 1.0
        return heavy, anomalous

    def take(self, key: bytes, now: float, base: float) -> Decision:
        """One request of client ``key`` at ``now`` under per-client ``base`` rate."""
        r = self.rule
        c = self.clients.get(key)
        if c is None:
            c = Client(tokens=max(1.0, base * r.burst_s), last=now, since=now)
            self.clients[key] = c
            if len(self.clients) > r.max_clients:
                self.clients.popitem(last=False)
        else:
            self.clients.move_to_end(key)
        dt = max(0.0, now - c.last)
        c.last = now
        c.short_rate = c.short_rate * math.exp(-dt / r.short_tau_s) + 1.0 / r.short_tau_s
        c.long_rate = c.long_rate * math.exp(-dt / r.long_tau_s) + 1.0 / r.long_tau_s
        if self.headroom >= r.headroom_threshold:
            factor = 1.0  # room to spare: no client is tightened, nothing to classify
        else:
            heavy, anomalous = self.classify(c, now)
            factor = r.factor(self.headroom, heavy, anomalous)
        rate = max(1e-6, base * factor)
        burst = max(1.0, rate * r.burst_s)
        c.tokens = min(burst, c.tokens + dt * rate)
        if c.tokens >= 1.0:
            c.tokens -= 1.0
            return Decision(True, rate, int(c.tokens), (burst - c.tokens) / rate, 0.0, factor)
        self.limited += 1
        wait = (1.0 - c.tokens) / rate
        return Decision(False, rate, 0, (burst - c.tokens) / rate, wait, factor)


def rate_headers(d: Decision) -> dict[str, str]:
    """``RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (IETF httpapi draft) and, on a
    refusal, ``Retry-After`` (whole seconds, at least 1).

    >>> rate_headers(Decision(False, 2.0, 0, 0.9, 0.4, 1.0))["Retry-After"]
    '1'
    """
    h = {"RateLimit-Limit": str(max(1, round(d.limit))),
         "RateLimit-Remaining": str(d.remaining),
         "RateLimit-Reset": str(max(0, math.ceil(d.reset_s)))}
    if not d.allowed:
        h["Retry-After"] = str(max(1, math.ceil(d.retry_after_s)))
    return h
