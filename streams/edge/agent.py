"""The edge agent: per-endpoint, per-interval telemetry, anonymized, published to Kafka.

Three pieces, each usable alone:

- :class:`TelemetryAggregator` (pure): ``record(endpoint, latency, status)`` per request;
  ``close_due(now)`` returns the EndpointTelemetry records of windows that have ended.
  Latency quantiles come from a mergeable DDSketch (1 % relative accuracy), not a list.
- :class:`TelemetryPublisher`: encodes and produces those records, as single values keyed
  by endpoint_id, or as one TelemetryBatch per partition (placed by the same murmur2 hash).
- :class:`EdgeAgent`: both, plus the host statistics (psutil) and a run loop.

Privacy: a client identifier given to ``record`` is turned into a keyed hash (HMAC-SHA256
with the agent's secret key) at once and never stored or sent; only the number of distinct
clients per window leaves the agent, and only when it is at least ``k_anonymity``.

>>> agg = TelemetryAggregator("agent-1", "eu-west", interval_seconds=5)
>>> for ms in (10.0, 12.0, 200.0):
...     agg.record("orders-1", ms, 200, api="orders", at=1000.0)
>>> [(w["endpoint_id"], w["request_count"], w["window_start"]) for w in agg.close_due(1005.0)]
[('orders-1', 3, 1000000)]
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from ddsketch import DDSketch

from schemas.codec import Codec, Record
from streams import metrics
from streams.kafka.partitioning import partition_for
from streams.kafka.producer import RecordProducer
from streams.kafka.runtime import KafkaRuntime
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import partition_count, topic_name

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 200
MAX_LATENCY_MS = 3_600_000.0  # an hour: anything longer is a clock bug, not a latency


class TelemetryInputError(ValueError):
    """A ``record()`` call with bad input; ``field`` names the argument at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


HostStats = Callable[[], dict[str, float]]


class PsutilHostStats:
    """CPU and memory use, and network bytes since the previous call, from psutil."""

    def __init__(self) -> None:
        psutil.cpu_percent(None)  # prime: the first call has no interval to measure
        io = psutil.net_io_counters()
        self._last = (io.bytes_recv, io.bytes_sent)

    def __call__(self) -> dict[str, float]:
        io = psutil.net_io_counters()
        last_in, last_out = self._last
        self._last = (io.bytes_recv, io.bytes_sent)
        return {
            "cpu_percent": min(100.0, psutil.cpu_percent(None)),
            "memory_percent": psutil.virtual_memory().percent,
            "net_in_bytes": max(0, io.bytes_recv - last_in),
            "net_out_bytes": max(0, io.bytes_sent - last_out),
        }


def zero_host_stats() -> dict[str, float]:
    """Host statistics for sources that have none (tests, pure replays)."""
    return {"cpu_percent": 0.0, "memory_percent": 0.0, "net_in_bytes": 0, "net_out_bytes": 0}


@dataclass
class _Window:
    start: float
    interval: float
    count: int = 0
    e4xx: int = 0
    e5xx: int = 0
    econnect: int = 0
    etimeout: int = 0
    max_ms: float = 0.0
    sketch: DDSketch = field(default_factory=lambda: DDSketch(0.01))
    clients: set[bytes] = field(default_factory=set)


@dataclass
class _Endpoint:
    endpoint_id: str
    api: str
    interval: float
    window: _Window | None = None
    in_flight: int = 0
    idle_windows: int = 0


class TelemetryAggregator:
    """Aggregates requests into per-endpoint windows aligned to the monitoring interval.

    Windows are aligned to multiples of the endpoint's interval in event time (``at``,
    epoch seconds; default: now), shifted by ``window_offset_seconds`` (a replayed trace
    whose rows start at :04 gets windows that start at :04). An endpoint that has been
    seen keeps getting windows, with zero requests, for ``idle_windows`` intervals after
    its last request, because a quiet window is information for the forecaster (a missing
    one is a gap).
    """

    def __init__(
        self,
        agent_id: str,
        region: str,
        *,
        interval_seconds: float = 5.0,
        endpoint_intervals: Mapping[str, float] | None = None,
        default_api: str = "default",
        endpoint_apis: Mapping[str, str] | None = None,
        k_anonymity: int = 5,
        client_hash_key: bytes = b"",
        max_endpoints: int = 10_000,
        idle_windows: int = 12,
        window_offset_seconds: float = 0.0,
        host_stats: HostStats = zero_host_stats,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {interval_seconds}")
        self.agent_id = agent_id
        self.region = region
        self.interval = float(interval_seconds)
        self.endpoint_intervals = dict(endpoint_intervals or {})
        self.default_api = default_api
        self.endpoint_apis = dict(endpoint_apis or {})
        self.k = k_anonymity
        self._key = client_hash_key or hashlib.sha256(agent_id.encode()).digest()
        self.max_endpoints = max_endpoints
        self.idle_windows = idle_windows
        self.offset = window_offset_seconds
        self.host_stats = host_stats
        self._endpoints: dict[str, _Endpoint] = {}
        self._pending: list[Record] = []  # windows closed by record() before close_due()
        self._lock = threading.Lock()  # record() may be called from request threads
        self._m_requests = metrics.AGENT_REQUESTS.labels(agent_id)
        self._m_late = metrics.AGENT_LATE.labels(agent_id)
        self._m_windows = metrics.AGENT_WINDOWS.labels(agent_id)
        self._m_endpoints = metrics.AGENT_ENDPOINTS.labels(agent_id)
        for endpoint_id, api in self.endpoint_apis.items():
            self._endpoint(endpoint_id, api)

    # ----------------------------------------------------------------- input

    def _reject(self, field_name: str, message: str) -> TelemetryInputError:
        metrics.AGENT_REJECTED.labels(self.agent_id, field_name).inc()
        return TelemetryInputError(field_name, message)

    def _endpoint(self, endpoint_id: str, api: str | None) -> _Endpoint:
        ep = self._endpoints.get(endpoint_id)
        if ep is None:
            if len(self._endpoints) >= self.max_endpoints:
                raise self._reject(
                    "endpoint_id", f"agent already tracks {self.max_endpoints} endpoints"
                )
            interval = float(self.endpoint_intervals.get(endpoint_id, self.interval))
            resolved_api = api or self.endpoint_apis.get(endpoint_id, self.default_api)
            ep = self._endpoints[endpoint_id] = _Endpoint(endpoint_id, resolved_api, interval)
            self._m_endpoints.set(len(self._endpoints))
        return ep

    def record(
        self,
        endpoint_id: str,
        latency_ms: float,
        status: int,
        *,
        api: str | None = None,
        client: str | None = None,
        at: float | None = None,
        connect_failure: bool = False,
        timed_out: bool = False,
        count: int = 1,
    ) -> None:
        """Count one request (or ``count`` alike ones: same latency and status, e.g. from a
        load balancer's counters). ``status`` is the HTTP status (0 when there was none).

        Raises :class:`TelemetryInputError` (and counts it) for bad input; the agent's
        state is unchanged then.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise self._reject("count", f"must be a whole number >= 0, got {count!r}")
        if not isinstance(endpoint_id, str) or not endpoint_id or len(endpoint_id) > MAX_ID_LENGTH:
            raise self._reject(
                "endpoint_id", f"must be a non-empty string of at most {MAX_ID_LENGTH} chars"
            )
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, int | float):
            raise self._reject("latency_ms", f"must be a number, got {type(latency_ms).__name__}")
        if not math.isfinite(latency_ms) or latency_ms < 0 or latency_ms > MAX_LATENCY_MS:
            raise self._reject(
                "latency_ms",
                f"must be finite, between 0 and {MAX_LATENCY_MS:.0f}, got {latency_ms}",
            )
        if isinstance(status, bool) or not isinstance(status, int) or not (
            status == 0 or 100 <= status <= 599
        ):
            raise self._reject("status", f"must be an HTTP status 100-599 or 0, got {status!r}")
        if api is not None and (not isinstance(api, str) or not api or len(api) > MAX_ID_LENGTH):
            raise self._reject("api", "must be a non-empty string")
        if at is not None and (not isinstance(at, int | float) or not math.isfinite(at) or at < 0):
            raise self._reject("at", f"must be epoch seconds, got {at!r}")
        ts = time.time() if at is None else float(at)
        with self._lock:
            ep = self._endpoint(endpoint_id, api)
            start = math.floor((ts - self.offset) / ep.interval) * ep.interval + self.offset
            w = ep.window
            if w is None or start > w.start:
                if w is not None:
                    # The window moved on before close_due() saw it: keep it as a pending
                    # close by closing now (rare; close_due is called every interval).
                    self._pending.append(self._finish(ep, w))
                w = ep.window = _Window(start, ep.interval)
            elif start < w.start:
                self._m_late.inc()  # its window is already out: count it in the current one
            ep.idle_windows = 0
            if count == 0:
                return
            w.count += count
            if connect_failure:
                w.econnect += count
            elif timed_out:
                w.etimeout += count
            elif 400 <= status < 500:
                w.e4xx += count
            elif status >= 500:
                w.e5xx += count
            if not connect_failure:
                w.sketch.add(float(latency_ms), float(count))
                if latency_ms > w.max_ms:
                    w.max_ms = float(latency_ms)
            if client is not None:
                w.clients.add(hmac.new(self._key, client.encode(), "sha256").digest()[:16])
        self._m_requests.inc(count)

    def request_started(self, endpoint_id: str) -> None:
        """Track in-flight requests (optional; call ``request_finished`` after)."""
        with self._lock:
            self._endpoint(endpoint_id, None).in_flight += 1

    def request_finished(self, endpoint_id: str) -> None:
        with self._lock:
            ep = self._endpoint(endpoint_id, None)
            ep.in_flight = max(0, ep.in_flight - 1)

    # ----------------------------------------------------------------- output

    def _finish(self, ep: _Endpoint, w: _Window) -> Record:
        q = w.sketch
        has = w.count - w.econnect > 0
        distinct = len(w.clients)
        self._m_windows.inc()
        return {
            "endpoint_id": ep.endpoint_id,
            "region": self.region,
            "api": ep.api,
            "agent_id": self.agent_id,
            "window_start": round(w.start * 1000),
            "window_end": round((w.start + w.interval) * 1000),
            "interval_ms": max(1, round(w.interval * 1000)),
            "request_count": w.count,
            "errors_4xx": w.e4xx,
            "errors_5xx": w.e5xx,
            "errors_connect": w.econnect,
            "latency_p50_ms": max(0.0, q.get_quantile_value(0.50) or 0.0) if has else 0.0,
            "latency_p95_ms": max(0.0, q.get_quantile_value(0.95) or 0.0) if has else 0.0,
            "latency_p99_ms": max(0.0, q.get_quantile_value(0.99) or 0.0) if has else 0.0,
            "latency_max_ms": w.max_ms,
            "in_flight": ep.in_flight,
            "errors_timeout": w.etimeout,
            # k-anonymity: a count from fewer than k clients is not sent at all.
            "distinct_clients": distinct if distinct >= self.k and distinct > 0 else None,
            "attributes": {},
        }

    def close_due(self, now: float | None = None) -> list[Record]:
        """Records of every window that ended at or before ``now`` (epoch seconds).

        Host statistics are sampled once per call and stamped on each record.
        """
        now = time.time() if now is None else now
        out: list[Record] = []
        with self._lock:
            out.extend(self._pending)
            self._pending.clear()
            for ep in self._endpoints.values():
                w = ep.window
                if w is None:
                    continue
                while w.start + w.interval <= now:
                    if w.count or ep.idle_windows < self.idle_windows:
                        out.append(self._finish(ep, w))
                    ep.idle_windows = 0 if w.count else ep.idle_windows + 1
                    w = _Window(w.start + w.interval, w.interval)
                    if ep.idle_windows >= self.idle_windows:
                        break  # idle endpoint: stop emitting until it is used again
                ep.window = w
        if out:
            host = self.host_stats()
            for r in out:
                r.update(host)
        return out

    def close_all(self) -> list[Record]:
        """Close every open window (at shutdown)."""
        with self._lock:
            ends = [ep.window.start + ep.window.interval for ep in self._endpoints.values()
                    if ep.window is not None and ep.window.count]
        return self.close_due(max(ends, default=0.0))

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)


class TelemetryPublisher:
    """Encodes telemetry and produces it to the telemetry topic.

    ``batch=True``: one TelemetryBatch per partition per call (at most ``max_batch``
    windows each), placed by the murmur2 hash of endpoint_id and keyed by the first
    endpoint of the batch, so it lands where each of its windows would land alone.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        producer: RecordProducer,
        codec: Codec,
        *,
        agent_id: str,
        region: str,
        batch: bool = False,
        max_batch: int = 2000,
    ) -> None:
        self.producer = producer
        self.codec = codec
        self.topic = topic_name(settings, "telemetry")
        self.agent_id = agent_id
        self.region = region
        self.batch = batch
        self.max_batch = max_batch
        self.partitions = partition_count(settings, self.topic) if batch else 0
        self._placement: dict[str, int] = {}  # murmur2 in Python is slow; endpoints repeat

    def publish(self, records: Iterable[Record]) -> int:
        """Produce ``records``; returns how many Kafka records were queued."""
        if not self.batch:
            n = 0
            for r in records:
                value = self.codec.encode("EndpointTelemetry", r)
                n += self.producer.produce(self.topic, value, r["endpoint_id"].encode())
            self.producer.poll(0)
            return n
        groups: dict[int, list[Record]] = {}
        placement = self._placement
        for r in records:
            endpoint = r["endpoint_id"]
            p = placement.get(endpoint)
            if p is None:
                if len(placement) > 100_000:
                    placement.clear()
                p = placement[endpoint] = partition_for(endpoint.encode(), self.partitions)
            groups.setdefault(p, []).append(r)
        n = 0
        now_ms = round(time.time() * 1000)
        for p, windows in groups.items():
            for i in range(0, len(windows), self.max_batch):
                chunk = windows[i : i + self.max_batch]
                value = self.codec.encode(
                    "TelemetryBatch",
                    {"agent_id": self.agent_id, "region": self.region, "created_at": now_ms,
                     "windows": chunk},
                )
                n += self.producer.produce(
                    self.topic, value, chunk[0]["endpoint_id"].encode(), partition=p
                )
        self.producer.poll(0)
        return n


class EdgeAgent:
    """An edge agent for one region: aggregator + publisher + a periodic flush loop.

    ``record(...)`` is the in-process API the routing sidecar and users' code call.
    ``tick(now)`` publishes the windows that have ended; ``run(stop)`` ticks every
    monitoring interval until ``stop`` is set.
    """

    def __init__(self, aggregator: TelemetryAggregator, publisher: TelemetryPublisher) -> None:
        self.aggregator = aggregator
        self.publisher = publisher
        self.windows_published = 0

    def record(self, endpoint_id: str, latency_ms: float, status: int, **kw: Any) -> None:
        self.aggregator.record(endpoint_id, latency_ms, status, **kw)

    def tick(self, now: float | None = None) -> int:
        records = self.aggregator.close_due(now)
        if records:
            self.publisher.publish(records)
            self.windows_published += len(records)
        else:
            self.publisher.producer.poll(0)
        return len(records)

    def run(self, stop: threading.Event, tick_seconds: float | None = None) -> None:
        """Tick until ``stop`` is set, then publish what is open and flush."""
        period = tick_seconds or min(1.0, self.aggregator.interval / 5)
        while not stop.wait(period):
            self.tick()
        self.close()

    def close(self, timeout: float = 30.0) -> int:
        """Publish every open window and wait for delivery; returns records still queued."""
        records = self.aggregator.close_all()
        if records:
            self.publisher.publish(records)
            self.windows_published += len(records)
        left = self.publisher.producer.flush(timeout)
        if left:
            log.error("%d telemetry records not delivered at shutdown", left)
        return left


def build_agent(
    settings: KafkaSettings,
    codec: Codec,
    *,
    agent_id: str,
    region: str,
    batch: bool = False,
    max_buffered: int = 100_000,
    host_stats: HostStats | None = None,
    **aggregator_options: Any,
) -> EdgeAgent:
    """Wire an :class:`EdgeAgent` to Kafka (the topics must exist)."""
    aggregator = TelemetryAggregator(
        agent_id, region, host_stats=host_stats or PsutilHostStats(), **aggregator_options
    )
    producer = KafkaRuntime(settings).record_producer(f"agent-{agent_id}",
                                                      max_buffered=max_buffered)
    publisher = TelemetryPublisher(
        settings, producer, codec, agent_id=agent_id, region=region, batch=batch
    )
    return EdgeAgent(aggregator, publisher)
