"""Simulated API backends: worker slots, a bounded FIFO queue, deadlines and shedding.

A backend serves at most ``slots`` requests at once (``None``: unlimited, every request
just takes its service time, as the backends of Finagle's load-balancer simulation do).
A request that finds every slot busy waits in the queue; with the queue full it is shed at
once (503). When a slot frees up, queued requests whose deadline has already passed are
dropped (503, "expired") instead of being served: the client has given up on them.

Service times are drawn per request from a distribution (:class:`ServiceTime`) and scaled
by the slowdown active when service starts (:class:`Slowdown`).

>>> import random
>>> st = ServiceTime("lognormal", 0.1, 0.4)
>>> round(st.mean, 4), 0.0 < st.sample(random.Random(1)) < 1.0
(0.1083, True)
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServiceTime:
    """A service-time distribution in seconds.

    ``lognormal``: ``a`` = median, ``b`` = sigma of the log.  ``normal``: ``a`` = mean,
    ``b`` = standard deviation (truncated at 1 ms).
    """

    kind: str
    a: float
    b: float

    def __post_init__(self) -> None:
        if self.kind not in ("lognormal", "normal"):
            raise ValueError(f"service time kind must be lognormal or normal, got {self.kind!r}")
        if self.a <= 0 or self.b < 0:
            raise ValueError("service time parameters must be positive")

    @property
    def mean(self) -> float:
        if self.kind == "lognormal":
            return self.a * math.exp(self.b * self.b / 2.0)
        return self.a

    def sample(self, rng: random.Random) -> float:
        if self.kind == "lognormal":
            return self.a * math.exp(rng.gauss(0.0, self.b))
        return max(0.001, rng.gauss(self.a, self.b))


@dataclass(frozen=True)
class Slowdown:
    """Backend ``backend`` is slow between ``start`` and ``end`` (sim seconds): service
    times are multiplied by ``factor``, or fixed to ``fixed_s`` seconds when given."""

    backend: int
    start: float
    end: float
    factor: float = 1.0
    fixed_s: float | None = None

    def active(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True)
class BackendSpec:
    """One backend: id, worker slots (None = unlimited), queue limit, service time."""

    id: str
    slots: int | None
    service: ServiceTime
    queue_limit: int | None = None

    @property
    def capacity_rps(self) -> float:
        """Requests per second it can complete when saturated (inf when unlimited)."""
        return math.inf if self.slots is None else self.slots / self.service.mean


@dataclass
class Backend:
    """Runtime state of one backend (the engine drives it)."""

    spec: BackendSpec
    index: int
    slowdowns: list[Slowdown] = field(default_factory=list)
    busy: int = 0
    queue: deque[int] = field(default_factory=deque)
    served: int = 0
    shed: int = 0
    expired: int = 0

    def service_time(self, t: float, rng: random.Random) -> float:
        """Service time of a request starting at ``t`` (slowdowns applied)."""
        base = self.spec.service.sample(rng)
        for s in self.slowdowns:
            if s.active(t):
                return s.fixed_s if s.fixed_s is not None else base * s.factor
        return base

    def speed_factor(self, t: float) -> float:
        """How many times slower than nominal it is at ``t`` (for capacity bookkeeping)."""
        for s in self.slowdowns:
            if s.active(t):
                if s.fixed_s is not None:
                    return s.fixed_s / self.spec.service.mean
                return s.factor
        return 1.0

    def effective_capacity(self, t: float) -> float:
        return self.spec.capacity_rps / self.speed_factor(t)

    def has_free_slot(self) -> bool:
        return self.spec.slots is None or self.busy < self.spec.slots

    def queue_full(self) -> bool:
        lim = self.spec.queue_limit
        return lim is not None and len(self.queue) >= lim
