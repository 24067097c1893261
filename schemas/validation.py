"""What a decoded telemetry window or LoadScore must satisfy beyond its schema: one set of
rules, used by every consumer (the worker, the sink — in Python and in the SQL of its
ClickHouse fast path —, the sidecar, the planner), so they never disagree on what is valid.

The codec already checks types and the ``loadcast.min``/``loadcast.max`` ranges (finite
doubles, non-negative counts). On top of that:

* a window starts in 1900 or later, ends after it starts, and spans at most
  ``max_window_seconds``;
* a window does not end further than ``clock_skew_seconds`` in the future;
* a LoadScore's ``computed_at`` is not further than ``clock_skew_seconds`` in the future.

"The future" is judged against a *reference time*: the Kafka timestamp of the record
(when its producer made it) when it has one, never later than the consumer's clock
(:func:`reference_ms`). Every consumer reading the same record therefore reaches the same
verdict, whenever it reads it.

>>> w = {"window_start": 0, "window_end": 5_000, "request_count": 3}
>>> telemetry_problem(w, ref_ms=10_000) is None
True
>>> telemetry_problem({**w, "window_end": 0}, ref_ms=10_000)
('bad_window', 'window_end (0) must be after window_start (0)')
>>> telemetry_problem({**w, "window_end": 7_200_001}, ref_ms=7_200_001)[0]
'bad_window'
>>> telemetry_problem(w, ref_ms=-60_000)[0]
'clock_skew'
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.codec import Codec, CodecError, Record

__all__ = [
    "DEFAULT_LIMITS",
    "Limits",
    "reencode",
    "reference_ms",
    "score_problem",
    "telemetry_problem",
    "telemetry_sql",
    "window_problem",
]


@dataclass(frozen=True)
class Limits:
    """The bounds (settings ``processor.max_window_seconds`` and
    ``processor.clock_skew_seconds``; the sink and sidecar use the defaults)."""

    max_window_seconds: float = 3600.0
    clock_skew_seconds: float = 60.0

    @property
    def max_window_ms(self) -> int:
        return round(self.max_window_seconds * 1000)

    @property
    def skew_ms(self) -> int:
        return round(self.clock_skew_seconds * 1000)


DEFAULT_LIMITS = Limits()
MIN_MS = -2_208_988_800_000  # 1900-01-01: what the sink's DateTime64 columns hold

Problem = tuple[str, str]  # (reason, detail)


def reference_ms(kafka_timestamp_ms: int | None = None, now_ms: int | None = None) -> int:
    """The time to judge "the future" by: the record's Kafka timestamp when it has one
    (> 0), but never later than the consumer's clock (a forged timestamp gains nothing)."""
    now = time.time_ns() // 1_000_000 if now_ms is None else int(now_ms)
    if kafka_timestamp_ms is not None and kafka_timestamp_ms > 0:
        return min(int(kafka_timestamp_ms), now)
    return now


def telemetry_problem(window: Mapping[str, Any], ref_ms: int,
                      limits: Limits = DEFAULT_LIMITS) -> Problem | None:
    """Why an EndpointTelemetry window (already schema-checked) is not valid, or None."""
    start, end = window["window_start"], window["window_end"]
    if start < MIN_MS:
        return "bad_window", f"window_start ({start}) is before 1900"
    if end <= start:
        return "bad_window", f"window_end ({end}) must be after window_start ({start})"
    if end - start > limits.max_window_ms:
        return "bad_window", (f"window spans {(end - start) / 1000:.0f} s, more than "
                              f"max_window_seconds ({limits.max_window_seconds:g})")
    if end > ref_ms + limits.skew_ms:
        return "clock_skew", (f"window_end is {(end - ref_ms) / 1000:.0f} s in the future "
                              f"(allowed: {limits.clock_skew_seconds:g} s)")
    count = window.get("request_count")
    if isinstance(count, float) and not math.isfinite(count):
        return "out_of_range", "request_count must be finite"
    return None


def score_problem(score: Mapping[str, Any], ref_ms: int,
                  limits: Limits = DEFAULT_LIMITS) -> Problem | None:
    """Why a LoadScore is not to be believed, or None: a ``computed_at`` from the future
    would otherwise win over every genuine score after it."""
    at = score["computed_at"]
    if at > ref_ms + limits.skew_ms:
        return "clock_skew", (f"computed_at is {(at - ref_ms) / 1000:.0f} s in the future "
                              f"(allowed: {limits.clock_skew_seconds:g} s)")
    return None


def telemetry_sql(prefix: str, ref_ms_sql: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """:func:`telemetry_problem`'s window rules as a ClickHouse predicate (true = valid)
    over columns ``{prefix}window_start``/``window_end`` (Int64 epoch ms); ``ref_ms_sql``
    is the SQL of the reference time in epoch ms.

    >>> for part in telemetry_sql("w.", "_ref").split(" AND "):
    ...     print(part)
    (w.window_start >= -2208988800000
    w.window_end > w.window_start
    w.window_end - w.window_start <= 3600000
    w.window_end <= _ref + 60000)
    """
    s, e = f"{prefix}window_start", f"{prefix}window_end"
    return (f"({s} >= {MIN_MS} AND {e} > {s} AND {e} - {s} <= {limits.max_window_ms} "
            f"AND {e} <= {ref_ms_sql} + {limits.skew_ms})")


def window_problem(codec: Codec, window: Record, ref_ms: int,
                   limits: Limits) -> tuple[str, str] | None:
    """(reason, detail) of a telemetry window to dead-letter, or None: its ranges (the
    schema's ``loadcast.min``/``max``) and :func:`telemetry_problem`; the worker and the
    sink judge every window of a batch by this."""
    try:
        codec.check("EndpointTelemetry", window)
    except CodecError as e:
        return "out_of_range", e.detail
    return telemetry_problem(window, ref_ms, limits)


def reencode(codec: Codec, window: Record) -> bytes:
    """One window of a batch on its own (the batch's own bytes would carry the good
    windows too: dead-letter just this one)."""
    lax = Codec(codec.ids, validate_on_encode=False)
    return lax.encode("EndpointTelemetry", window)
