"""Turn monitoring-interval telemetry windows into model steps.

Edge agents report every monitoring interval (say 5 s); a forecaster learns once per model
step (say 60 s).  :class:`Stepper` accumulates ``(window_start_ms, window_end_ms,
request_count)`` per endpoint and returns each step once it is closed, as a :class:`Step`
whose first two fields are ``(start, rate)``: the step start in epoch seconds and the
request rate in requests per second.

Rules (chosen to keep the forecaster honest):

* Steps are aligned to the epoch: step ``k`` covers ``[k * step, (k + 1) * step)``.  A window
  that straddles a boundary is split in proportion to its overlap.
* The rate is requests divided by the *covered* seconds, so a step that is only partly
  reported (agent started mid-step, a window was lost) still gives an unbiased rate.  A step
  covered less than ``min_coverage`` is not emitted.
* A step with no windows at all is a **gap, not a zero**.  Agents report every interval,
  including intervals with ``request_count = 0``, so silence means "no data", and the
  forecaster is better off learning nothing than learning a false zero.  Such steps are
  simply never emitted; the forecaster sees the jump in ``ts`` and treats it as a gap.
* Windows may arrive out of order.  A step closes once a window of the same endpoint ends
  at least ``lateness_seconds`` after the step's end (or on :meth:`Stepper.close_until` /
  :meth:`Stepper.flush`).  Windows for an already-closed step are dropped and counted in
  ``late``.
* A window whose ``window_start`` was already seen for that endpoint and step is a
  duplicate (at-least-once delivery) and is dropped, never double-counted.

>>> s = Stepper(step_seconds=60, lateness_seconds=5)
>>> for start in range(0, 60_000, 5_000):
...     _ = s.add("a", start, start + 5_000, 10)
>>> s.add("a", 0, 5_000, 10)  # duplicate: ignored
[]
>>> s.add("a", 65_000, 70_000, 0)  # ends 10 s after step 0: step 0 closes
[Step(start=0.0, rate=2.0, coverage=1.0, windows=12)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Step", "Stepper"]


class Step(NamedTuple):
    """One closed model step of one endpoint."""

    start: float  # epoch seconds
    rate: float  # requests per second over the covered part of the step
    coverage: float  # covered fraction of the step, (0, 1]
    windows: int  # windows that contributed


@dataclass
class _Open:
    count: float = 0.0
    covered_ms: float = 0.0
    starts: set[int] = field(default_factory=set)


@dataclass
class _Endpoint:
    open: dict[int, _Open] = field(default_factory=dict)  # step index -> accumulator
    closed_through: int | None = None  # highest step index already closed
    watermark_ms: int | None = None  # latest window end seen


class Stepper:
    """Per-endpoint window-to-step accumulator (pure, picklable).

    A window covering more than ``max_steps`` steps is refused (counted in ``invalid``):
    the work one window can cause is bounded whatever its timestamps say.
    """

    max_steps: int = 1440  # class default: also for steppers pickled before it existed

    def __init__(
        self, step_seconds: int, lateness_seconds: float = 10.0, min_coverage: float = 0.25,
        max_steps: int = 1440,
    ) -> None:
        if step_seconds <= 0:
            raise ValueError("step_seconds must be positive")
        self.step_seconds = int(step_seconds)
        self.step_ms = self.step_seconds * 1000
        self.lateness_ms = round(lateness_seconds * 1000)
        self.min_coverage = float(min_coverage)
        self.max_steps = int(max_steps)
        self._eps: dict[str, _Endpoint] = {}
        self.duplicates = 0
        self.late = 0
        self.invalid = 0
        self.sparse = 0  # closed steps dropped for low coverage

    def add(
        self, endpoint_id: str, window_start_ms: int, window_end_ms: int, request_count: float
    ) -> list[Step]:
        """Add one window; returns the steps of ``endpoint_id`` this closed (oldest first)."""
        start, end = int(window_start_ms), int(window_end_ms)
        if end <= start or not request_count >= 0:  # also rejects NaN
            self.invalid += 1
            return []
        ep = self._eps.get(endpoint_id)
        if ep is None:  # not setdefault: that would build an _Endpoint for every window
            ep = self._eps[endpoint_id] = _Endpoint()
        first, last = start // self.step_ms, (end - 1) // self.step_ms
        if last - first >= self.max_steps:
            self.invalid += 1
            return []
        if ep.closed_through is not None and first <= ep.closed_through:
            self.late += 1
            return []
        acc = ep.open.get(first)
        if acc is not None and start in acc.starts:
            self.duplicates += 1
            return []
        duration = end - start
        step_ms = self.step_ms
        for k in range(first, last + 1):
            lo, hi = max(start, k * step_ms), min(end, (k + 1) * step_ms)
            part = ep.open.get(k) if k != first else acc
            if part is None:
                part = ep.open[k] = _Open()
            part.count += request_count * (hi - lo) / duration
            part.covered_ms += hi - lo
            part.starts.add(start)
        if ep.watermark_ms is None or end > ep.watermark_ms:
            ep.watermark_ms = end
        return self._close(ep, ep.watermark_ms - self.lateness_ms)

    def close_until(self, endpoint_id: str, now_ms: int) -> list[Step]:
        """Close the steps that ended at or before ``now_ms - lateness`` (a clock tick, for
        endpoints that went quiet)."""
        ep = self._eps.get(endpoint_id)
        return [] if ep is None else self._close(ep, int(now_ms) - self.lateness_ms)

    def flush(self, endpoint_id: str) -> list[Step]:
        """Close every open step of ``endpoint_id`` (shutdown, snapshot)."""
        ep = self._eps.get(endpoint_id)
        if ep is None or not ep.open:
            return []
        return self._close(ep, (max(ep.open) + 1) * self.step_ms)

    @property
    def endpoints(self) -> list[str]:
        return sorted(self._eps)

    def _close(self, ep: _Endpoint, until_ms: int) -> list[Step]:
        if not ep.open or (min(ep.open) + 1) * self.step_ms > until_ms:
            return []  # the usual case, once per window: nothing to close, nothing to sort
        out: list[Step] = []
        for k in sorted(ep.open):
            if (k + 1) * self.step_ms > until_ms:
                break
            acc = ep.open.pop(k)
            ep.closed_through = k if ep.closed_through is None else max(ep.closed_through, k)
            coverage = min(acc.covered_ms / self.step_ms, 1.0)
            if coverage < self.min_coverage:
                self.sparse += 1
                continue
            rate = acc.count / (acc.covered_ms / 1000.0)
            out.append(Step(k * self.step_seconds * 1.0, rate, coverage, len(acc.starts)))
        return out
