"""Decoded records to table rows (plain functions, no I/O).

``rows_for(topic, record)`` returns the rows (tuples in ``TableSpec.columns`` order, without
the Kafka coordinates) one value becomes: one row, or one per window for a TelemetryBatch.
Values ClickHouse columns cannot hold raise :class:`ConversionError`, so a bad record is
dead-lettered alone instead of failing the insert of a whole batch.

>>> rows = rows_for("anomalies", {"endpoint_id": "e1", "api": "a", "region": "r",
...     "detected_at": 2000, "window_start": 1000, "score": 0.9, "threshold": 0.5,
...     "detector": "hst", "features": {}})
>>> rows[0][:4]
('e1', 'a', 'r', 2000)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = tuple[Any, ...]

# Which value schemas each topic may carry.
TOPIC_SCHEMAS: dict[str, tuple[str, ...]] = {
    "telemetry": ("loadcast.EndpointTelemetry", "loadcast.TelemetryBatch"),
    "load-scores": ("loadcast.LoadScore",),
    "mirror-commands": ("loadcast.MirrorCommand",),
    "mirror-status": ("loadcast.MirrorStatus",),
    "routing-decisions": ("loadcast.RoutingDecision",),
    "model-updates": ("loadcast.ModelUpdate",),
    "global-model": ("loadcast.GlobalModel",),
    "anomalies": ("loadcast.Anomaly",),
    "tasks": ("loadcast.Task",),
    "task-status": ("loadcast.TaskStatus",),
    "task-results": ("loadcast.TaskResult",),
}

_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
# DateTime64(3) holds years 1900..2299; epoch ms outside that is a clock bug.
_MIN_MS = -2_208_988_800_000
_MAX_MS = 10_413_791_999_999


class ConversionError(ValueError):
    """A decoded record whose values do not fit its table's columns."""


def _uint(v: Any, top: int, where: str) -> int:
    if not isinstance(v, int) or v < 0 or v > top:
        raise ConversionError(f"{where}={v!r} does not fit an unsigned column (max {top})")
    return v


def _ms(v: Any, where: str) -> int:
    if not isinstance(v, int) or not _MIN_MS <= v <= _MAX_MS:
        raise ConversionError(f"{where}={v!r} is not a timestamp in 1900..2299 (epoch ms)")
    return v


def _num(v: Any, where: str) -> float:
    if not isinstance(v, int | float) or not math.isfinite(v):
        raise ConversionError(f"{where}={v!r} is not a finite number")
    return float(v)


def _params(items: Any) -> dict[str, list[float]]:
    return {p["name"]: list(p["values"]) for p in items or ()}


def _forecast(points: Any) -> tuple[list[int], list[int], list[float], list[float], list[float]]:
    horizons, ats, means, lowers, uppers = [], [], [], [], []
    for i, p in enumerate(points or ()):
        horizons.append(_uint(p["horizon"], _U16, f"forecast[{i}].horizon"))
        ats.append(_ms(p["at"], f"forecast[{i}].at"))
        means.append(p["mean"])
        lowers.append(p["lower"])
        uppers.append(p["upper"])
    return horizons, ats, means, lowers, uppers


def telemetry_row(w: Mapping[str, Any]) -> Row:
    """One EndpointTelemetry window as a ``telemetry`` row."""
    errors = {
        "4xx": _uint(w["errors_4xx"], _U64, "errors_4xx"),
        "5xx": _uint(w["errors_5xx"], _U64, "errors_5xx"),
        "connect": _uint(w["errors_connect"], _U64, "errors_connect"),
        "timeout": _uint(w.get("errors_timeout", 0), _U64, "errors_timeout"),
    }
    return (
        w["endpoint_id"], w["region"], w["api"], w["agent_id"],
        _ms(w["window_start"], "window_start"), _ms(w["window_end"], "window_end"),
        _uint(w["interval_ms"], _U32, "interval_ms"),
        _uint(w["request_count"], _U64, "request_count"), errors,
        w["latency_p50_ms"], w["latency_p95_ms"], w["latency_p99_ms"], w["latency_max_ms"],
        w["cpu_percent"], w["memory_percent"],
        _uint(w["net_in_bytes"], _U64, "net_in_bytes"),
        _uint(w["net_out_bytes"], _U64, "net_out_bytes"),
        _uint(w.get("in_flight", 0), _U32, "in_flight"),
        w.get("distinct_clients"), dict(w.get("attributes") or {}),
    )


def _telemetry(r: Mapping[str, Any]) -> list[Row]:
    if "windows" in r:
        return [telemetry_row(w) for w in r["windows"]]
    return [telemetry_row(r)]


def _load_score(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["endpoint_id"], r["api"], r["region"],
        _ms(r["computed_at"], "computed_at"), _ms(r["valid_until"], "valid_until"),
        r["score"], r["capacity_rps"], r.get("capacity_source", "DEFAULT"), r["current_rps"],
        r["predicted_utilization"], r["latency_p99_ms"], r["error_rate"],
        r.get("anomaly_score", 0.0), _uint(r["step_seconds"], _U32, "step_seconds"),
        *_forecast(r["forecast"]), r.get("model", "default"), list(r.get("reasons") or ()),
    )]


def _mirror_command(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["command_id"], r["action"], r["api"], r["region"], r["bundle_digest"],
        _uint(r["desired_instances"], _U32, "desired_instances"),
        _uint(r["sequence"], _U64, "sequence"),
        _ms(r["issued_at"], "issued_at"), _ms(r["expires_at"], "expires_at"), r["reason"],
        r["central_capacity_rps"], *_forecast(r["forecast"]), r["key_id"], bytes(r["signature"]),
    )]


def _mirror_status(r: Mapping[str, Any]) -> list[Row]:
    cap = r.get("capacity_rps")
    return [(
        r["executor_id"], r["region"], r["api"], r["command_id"],
        _uint(r["sequence"], _U64, "sequence"), r["state"], _ms(r["at"], "at"),
        r.get("instance_url"), r.get("bundle_digest"), r.get("reason", ""),
        None if cap is None else _num(cap, "capacity_rps"),
    )]


def _routing_decision(r: Mapping[str, Any]) -> list[Row]:
    status = r.get("status")
    return [(
        r["sidecar_id"], r["region"], r["api"], _ms(r["at"], "at"), r["kind"], r["policy"],
        bool(r["stale"]), dict(r.get("weights") or {}), dict(r.get("previous_weights") or {}),
        dict(r.get("scores") or {}), r.get("endpoint_id"),
        None if status is None else _uint(status, _U16, "status"),
        r.get("latency_ms"), _uint(r.get("attempts", 1), _U32, "attempts"),
        bool(r.get("dynamic_routing", True)),
    )]


def _model_update(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["family"], r["edge_id"], _uint(r["round"], _U32, "round"),
        _uint(r["base_version"], _U32, "base_version"), _ms(r["created_at"], "created_at"),
        _uint(r["num_samples"], _U64, "num_samples"), r.get("validation_mae"),
        _params(r["delta"]), _params(r.get("scaler")),
    )]


def _global_model(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["family"], _uint(r["version"], _U32, "version"), _uint(r["round"], _U32, "round"),
        _ms(r["created_at"], "created_at"), r["aggregation"], list(r["participants"]),
        _uint(r["num_samples"], _U64, "num_samples"), _params(r["params"]),
        _params(r.get("scaler")), dict(r.get("metrics") or {}),
    )]


def _anomaly(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["endpoint_id"], r["api"], r["region"], _ms(r["detected_at"], "detected_at"),
        _ms(r["window_start"], "window_start"), r["score"], r["threshold"],
        r.get("detector", "halfspacetrees"), dict(r.get("features") or {}),
    )]


def _task(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["task_id"], r["task_type"], _uint(r["attempt"], _U32, "attempt"),
        _uint(r["max_attempts"], _U32, "max_attempts"), _uint(r["lease_ms"], _U64, "lease_ms"),
        _ms(r["submitted_at"], "submitted_at"), _ms(r["enqueued_at"], "enqueued_at"),
        r["description"], r.get("requirements", "{}"),
    )]


def _task_status(r: Mapping[str, Any]) -> list[Row]:
    started = r.get("started_at")
    return [(
        r["task_id"], r["task_type"], r["state"], _uint(r["attempt"], _U32, "attempt"),
        _uint(r["max_attempts"], _U32, "max_attempts"), _ms(r["at"], "at"),
        _ms(r["submitted_at"], "submitted_at"),
        None if started is None else _ms(started, "started_at"), r.get("worker"),
        r.get("reason", ""), r.get("source", ""),
    )]


def _task_result(r: Mapping[str, Any]) -> list[Row]:
    return [(
        r["task_id"], r["task_type"], _uint(r["attempt"], _U32, "attempt"), r["worker"],
        _ms(r["at"], "at"), _ms(r["started_at"], "started_at"), r.get("output", ""),
        r.get("output_ref"), _uint(r.get("output_bytes", 0), _U64, "output_bytes"),
    )]


CONVERTERS: dict[str, Callable[[Mapping[str, Any]], list[Row]]] = {
    "telemetry": _telemetry,
    "load-scores": _load_score,
    "mirror-commands": _mirror_command,
    "mirror-status": _mirror_status,
    "routing-decisions": _routing_decision,
    "model-updates": _model_update,
    "global-model": _global_model,
    "anomalies": _anomaly,
    "tasks": _task,
    "task-status": _task_status,
    "task-results": _task_result,
}


def rows_for(topic: str, record: Mapping[str, Any]) -> list[Row]:
    """Rows of the table of ``topic`` (short name) for one decoded value.

    Raises :class:`ConversionError` for values the columns cannot hold (also a record
    missing a field, which the codec would not produce but a registry schema might).
    """
    try:
        return CONVERTERS[topic](record)
    except ConversionError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{type(e).__name__}: {e}") from e


Headers = Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None


def header_map(headers: Headers) -> dict[str, str]:
    """Kafka headers as a str map (last one wins; undecodable bytes replaced)."""
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    return {
        k: v.decode("utf-8", "replace") if isinstance(v, bytes) else (v or "")
        for k, v in items
    }


def _int_or(v: str | None, default: int) -> int:
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def dead_letter_row(
    topic: str, partition: int, offset: int, timestamp_ms: int,
    key: bytes | None, value: bytes | None, headers: Headers,
) -> Row:
    """A ``dead_letter`` row for a record read from the dead-letter topic.

    The source coordinates come from the ``loadcast.*`` headers; a record without them is
    its own source (so it still has a unique key).
    """
    h = header_map(headers)
    src_topic = h.get("loadcast.source_topic") or topic
    own = "loadcast.source_topic" not in h
    return (
        src_topic,
        partition if own else _int_or(h.get("loadcast.partition"), -1),
        offset if own else _int_or(h.get("loadcast.offset"), -1),
        h.get("loadcast.reason", "unknown"),
        h.get("loadcast.detail", ""),
        timestamp_ms if _MIN_MS <= timestamp_ms <= _MAX_MS else 0,
        key or b"", value or b"", h,
    )
