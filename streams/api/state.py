"""What the API knows: the latest LoadScore of every endpoint with a short history, the
latest anomaly per endpoint, mirror statuses, and the latest global model per family.

Plain Python, applied on the event loop (the Kafka feed hands batches over with
``call_soon_threadsafe``), so readers never see half an update. ``version`` grows with
every change; :meth:`ForecastState.changed` lets a live view wait for the next one.

>>> from schemas.records import ForecastPoint, LoadScore
>>> st = ForecastState(history_points=3, max_endpoints=10)
>>> s = LoadScore("e1", "orders", "eu", 1_000, 6_000, 0.8, 100.0, "CONFIGURED", 40.0, 0.5,
...               12.0, 0.0, 0.0, 5, (ForecastPoint(1, 6_000, 45.0, 40.0, 50.0),))
>>> st.apply([("LoadScore", {**s.__dict__, "forecast": [p.__dict__ for p in s.forecast]})])
>>> st.scores["e1"].capacity_rps, st.version
(100.0, 1)
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from processors.mirroring import demand_series_id
from schemas.records import LoadScore

Batch = Iterable[tuple[str, dict[str, Any]]]


@dataclass
class MirrorView:
    """The latest status of one mirror (region, api), with when each state began."""

    region: str
    api: str
    state: str
    at: int
    command_id: str
    instance_url: str | None
    capacity_rps: float | None
    reason: str
    since: dict[str, int] = field(default_factory=dict)  # state -> first seen at (ms)


def _order(score: LoadScore) -> tuple[int, int]:
    """Which of two scores of an endpoint is newer: computed later, or computed in the same
    millisecond (a worker catching up scores several steps at once) for a later step; a
    tie is the same score read again, and the later in the log wins."""
    return score.computed_at, score.forecast[0].at if score.forecast else 0


class ForecastState:
    """Latest scores and friends, bounded in endpoints and history."""

    def __init__(self, *, history_points: int = 720, max_endpoints: int = 100_000) -> None:
        self.history_points = history_points
        self.max_endpoints = max_endpoints
        self.scores: dict[str, LoadScore] = {}
        self.history: dict[str, deque[LoadScore]] = {}
        self.anomalies: dict[str, dict[str, Any]] = {}
        self.mirrors: dict[tuple[str, str], MirrorView] = {}
        self.models: dict[str, dict[str, Any]] = {}  # family -> GlobalModel without params
        # endpoint -> what a reader derived from its latest score (the API's answer parts),
        # found in one lookup. A newer score drops it; with `prepare` set, an endpoint
        # that had it gets it again from the new score at the end of the batch (an
        # endpoint asked about stays ready: its next question does not pay for it)
        self.prepared: dict[str, Any] = {}
        self.prepare: Callable[[LoadScore], Any] | None = None
        self._renewed: set[str] = set()
        self.version = 0
        self.updated_at: float | None = None  # wall time of the last change
        self.newest_ms = 0  # computed_at of the newest score
        self.ignored_endpoints = 0  # scores of endpoints over max_endpoints
        self._waiters: list[asyncio.Future[None]] = []

    def apply(self, batch: Batch) -> None:
        """Apply decoded records (schema short name, record); newer scores win."""
        changed = False
        for name, rec in batch:
            if name == "LoadScore":
                changed |= self._score(LoadScore.from_record(rec))
            elif name == "Anomaly":
                self.anomalies[rec["endpoint_id"]] = rec
                changed = True
            elif name == "MirrorStatus":
                self._mirror(rec)
                changed = True
            elif name == "MirrorCommand":
                changed |= self._command(rec)
            elif name == "GlobalModel":
                changed |= self._model(rec)
        if changed:
            self.version += 1
            self.updated_at = time.time()
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)
            self._waiters.clear()
        renewed, self._renewed = self._renewed, set()
        if self.prepare is not None:
            for eid in renewed:  # one at a time: an error leaves the rest simply absent
                self.prepared[eid] = self.prepare(self.scores[eid])

    def _score(self, score: LoadScore) -> bool:
        eid = score.endpoint_id
        old = self.scores.get(eid)
        if old is None and len(self.scores) >= self.max_endpoints:
            self.ignored_endpoints += 1
            return False
        if old is not None and _order(score) < _order(old):
            return False  # a late score never replaces a newer one
        self.scores[eid] = score
        if self.prepared.pop(eid, None) is not None:
            self._renewed.add(eid)
        self.newest_ms = max(self.newest_ms, score.computed_at)
        hist = self.history.get(eid)
        if hist is None:
            hist = self.history[eid] = deque(maxlen=self.history_points)
        hist.append(score)
        return True

    def _mirror(self, rec: dict[str, Any]) -> None:
        key = (rec["region"], rec["api"])
        view = self.mirrors.get(key)
        state = str(rec["state"])
        if view is not None and rec["at"] < view.at:
            return
        since = dict(view.since) if view is not None and view.command_id == rec["command_id"] \
            else {}
        since.setdefault(state, rec["at"])
        self.mirrors[key] = MirrorView(
            region=rec["region"], api=rec["api"], state=state, at=rec["at"],
            command_id=rec["command_id"], instance_url=rec.get("instance_url"),
            capacity_rps=rec.get("capacity_rps"), reason=rec.get("reason", ""), since=since)

    def _command(self, rec: dict[str, Any]) -> bool:
        """A planner's command, shown before an executor reports on it: ``COMMANDED``
        (activate) or ``RETIRE_COMMANDED`` (retire, hibernate). Not verified here (the
        executors verify signatures before acting); a later status of the same command
        takes over and keeps when it was commanded."""
        key = (rec["region"], rec["api"])
        view = self.mirrors.get(key)
        at = int(rec["issued_at"])
        if view is not None and (view.command_id == rec["command_id"] or at < view.at):
            return False  # the executor already spoke for it, or an older command
        state = "COMMANDED" if str(rec["action"]) == "ACTIVATE" else "RETIRE_COMMANDED"
        self.mirrors[key] = MirrorView(
            region=rec["region"], api=rec["api"], state=state, at=at,
            command_id=rec["command_id"], instance_url=None if view is None
            else view.instance_url, capacity_rps=None, reason=rec.get("reason", ""),
            since={state: at})
        return True

    def _model(self, rec: dict[str, Any]) -> bool:
        family = rec["family"]
        old = self.models.get(family)
        if old is not None and rec["version"] <= old["version"]:
            return False
        self.models[family] = {k: v for k, v in rec.items() if k not in ("params", "scaler")}
        return True

    def find(self, endpoint_id: str | None = None, *, api: str | None = None,
             region: str | None = None) -> list[LoadScore]:
        """The latest score of ``endpoint_id``, or of every endpoint of ``api`` (in
        ``region`` if given), sorted by endpoint. A region's demand series
        (:func:`processors.mirroring.demand_series_id`) is not an endpoint: found by its
        id only (summed with the endpoints, it would count their requests twice).

        >>> from schemas.records import LoadScore
        >>> st = ForecastState()
        >>> for e in ("orders-eu-1", "orders-demand-eu"):
        ...     st.scores[e] = LoadScore(e, "orders", "eu", 0, 1, 0.5, 10.0, "CONFIGURED",
        ...                              5.0, 0.5, 1.0, 0.0, 0.0, 1, ())
        >>> [s.endpoint_id for s in st.find(api="orders")], len(st.find("orders-demand-eu"))
        (['orders-eu-1'], 1)
        """
        if endpoint_id is not None:
            s = self.scores.get(endpoint_id)
            return [s] if s is not None else []
        return sorted(
            (s for s in self.scores.values()
             if (api is None or s.api == api) and (region is None or s.region == region)
             and s.endpoint_id != demand_series_id(s.api, s.region)),
            key=lambda s: s.endpoint_id)

    def newest_age_s(self, now: float | None = None) -> float | None:
        """Seconds since the newest score was computed (None before any)."""
        if not self.scores:
            return None
        newest = self.newest_ms  # kept by _score: /health must not walk every endpoint
        return max(0.0, (now if now is not None else time.time()) - newest / 1000)

    async def changed(self, after_version: int, timeout: float) -> bool:
        """Wait until ``version`` > ``after_version`` (True) or ``timeout`` s (False)."""
        if self.version > after_version:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                await fut
        except TimeoutError:
            return self.version > after_version
        finally:
            if fut in self._waiters:  # timed out or cancelled: do not pile up
                self._waiters.remove(fut)
        return True
