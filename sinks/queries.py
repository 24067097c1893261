"""Running queries over the sink's tables: the canned ones (:mod:`sinks.canned`, by
name, with bound parameters only) and read-only SQL; results as :class:`QueryResult`
(column names + rows of plain JSON-able values), with a reason when there are no rows.

Every canned query takes the same bound parameters (never pasted into SQL): ``since_ms``
and ``until_ms`` (epoch ms, half-open range), ``endpoint`` and ``api`` ('' = all).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sinks.canned import CANNED, SOURCES
from sinks.errors import QueryError
from sinks.sqlguard import check_sql

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

MAX_ROWS = 100_000


@dataclass
class QueryResult:
    """Column names and rows (JSON-able: datetimes as ISO strings, bytes as text)."""

    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
    note: str = ""  # with no rows: why, most likely (see :func:`empty_reason`)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"columns": self.columns, "rows": self.rows,
                               "truncated": self.truncated}
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QueryResult:
        return cls(list(data["columns"]), [list(r) for r in data["rows"]],
                   bool(data.get("truncated", False)), str(data.get("note") or ""))



_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Epoch ms from ``now``, a duration ago (``90s``, ``15m``, ``2h``, ``7d``), epoch ms,
    or an ISO-8601 time (UTC unless it says otherwise).

    >>> parse_time("2h", now_ms=10_000_000)
    2800000
    >>> parse_time("1970-01-01T00:00:01")
    1000
    """
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    t = text.strip()
    if t == "now":
        return now
    m = _DURATION.match(t)
    if m:
        return now - round(float(m.group(1)) * _UNIT_MS[m.group(2)])
    if t.isdigit():
        return int(t)
    try:
        d = dt.datetime.fromisoformat(t)
    except ValueError:
        raise QueryError(
            f"bad time {text!r}: use now, a duration ago like 15m/2h/7d, epoch ms, "
            "or ISO-8601 like 2026-01-31T12:00"
        ) from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.UTC)
    return round(d.timestamp() * 1000)


def canned_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The bound parameters of canned query ``name``: defaults filled, types checked."""
    q = CANNED.get(name)
    if q is None:
        raise QueryError(f"no query {name!r}; known: {', '.join(CANNED)}")
    now = time.time_ns() // 1_000_000
    out: dict[str, Any] = {
        "since_ms": now - 86_400_000, "until_ms": now + 86_400_000, "endpoint": "", "api": "",
    }
    out.update({k: v for k, (_, v) in q.extra.items()})
    unknown = set(params) - set(out)
    if unknown:
        raise QueryError(f"{name} takes no parameter {sorted(unknown)}; takes {sorted(out)}")
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(out[k], int):
            if isinstance(v, bool) or not isinstance(v, int):
                raise QueryError(f"parameter {k} must be an integer, not {v!r}")
            if k not in ("since_ms", "until_ms") and v < 0:
                raise QueryError(f"parameter {k} must be >= 0, not {v}")
        elif not isinstance(v, str):
            raise QueryError(f"parameter {k} must be a string, not {v!r}")
        out[k] = v
    if out["since_ms"] >= out["until_ms"]:
        raise QueryError("since must be before until")
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.UTC)
        return v.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, UUID):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _result(client: Client, sql: str, params: dict[str, Any],
            settings: dict[str, Any] | None = None) -> QueryResult:
    r = client.query(sql, parameters=params, settings=settings)
    rows = r.result_rows
    truncated = len(rows) > MAX_ROWS
    columns = list(r.column_names)
    if not rows and not columns:  # no block came back: ask for the header alone
        try:
            d = client.query(f"DESCRIBE TABLE ({sql.strip().rstrip(';')})",
                             parameters=params, settings=settings)
            columns = [str(c[0]) for c in d.result_rows]
        except Exception:  # the header is a courtesy; the (empty) answer stands
            columns = []
    return QueryResult(columns, [[_plain(v) for v in row] for row in rows[:MAX_ROWS]],
                       truncated)


def run_canned(client: Client, name: str, params: dict[str, Any] | None = None) -> QueryResult:
    """Run canned query ``name`` with bound ``params`` (see :func:`canned_params`)."""
    bound = canned_params(name, params or {})
    result = _result(client, CANNED[name].sql, bound)
    if not result.rows:
        result.note = empty_reason(client, name, bound)
    return result


def run_sql(client: Client, sql: str, params: dict[str, Any] | None = None) -> QueryResult:
    """Run one read-only statement; ``{name:Type}`` placeholders bind ``params``.

    Refused before it runs (:class:`sinks.sqlguard.SqlRefused`, a :class:`QueryError`)
    when it is not one reading statement or reaches files, URLs or other servers; then
    run with ``readonly=1`` (no writes, no setting changes, no table functions)."""
    if not sql.strip():
        raise QueryError("empty SQL")
    check_sql(sql)
    result = _result(client, sql, params or {}, settings={"readonly": 1})
    if not result.rows:
        result.note = "no rows"
    return result


def _ago(ms: int) -> str:
    s = max(0, ms) / 1000
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def empty_reason(client: Client, name: str, bound: dict[str, Any]) -> str:
    """One line: canned query ``name`` found no rows, and the likeliest reason (the source
    table is empty: sink not running or everything past the TTL; nothing in the lookback;
    filters; or nothing to compute yet)."""
    table, column = SOURCES[name]
    try:
        count, oldest, newest = client.query(
            f"SELECT count(), toUnixTimestamp64Milli(min({column})), "
            f"toUnixTimestamp64Milli(max({column})) FROM {table}"
        ).result_rows[0]
    except Exception as e:  # a reason, not a second failure
        return f"no rows (and {table} could not be inspected: {str(e).splitlines()[0][:200]})"
    now = time.time_ns() // 1_000_000
    if not count:
        if name == "dead-letter":
            return "no rows: nothing was ever dead-lettered (or the sink has not stored anything)"
        source = {"telemetry": "`loadcast agent` (or a sidecar)",
                  "load_scores": "`loadcast worker`", "anomalies": "`loadcast worker`",
                  "mirror_status": "`loadcast executor`"}.get(table, "anything")
        return (f"no rows: the {table} table is empty. Is `loadcast sink` running, and is "
                f"{source} publishing? Rows older than the sink's TTL (sink.ttl_days) are "
                f"dropped at insert: the sink warns and counts them "
                f"(loadcast_sink_expired_rows_total); `loadcast agent --replay` re-times "
                f"traces to now unless --keep-timestamps.")
    if int(newest) < bound["since_ms"]:
        return (f"no rows in the lookback: the newest {table} row is from {_iso(int(newest))}"
                f" ({_ago(now - int(newest))} ago); widen --since "
                f"(e.g. --since {_ago(now - int(oldest)) if now > int(oldest) else '7d'}).")
    if int(oldest) >= bound["until_ms"]:
        return (f"no rows before --until: the oldest {table} row is from "
                f"{_iso(int(oldest))}.")
    filters = [f"--{k} {bound[k]}" for k in ("endpoint", "api") if bound.get(k)]
    if filters:
        return (f"no rows for {' '.join(filters)} in the range ({count} {table} rows in all, "
                f"{_iso(int(oldest))} .. {_iso(int(newest))}).")
    why = {
        "forecast-accuracy": "no forecast point has met its actual yet (telemetry must "
                             "reach past the forecast step's end)",
        "mirror-lead-time": "no mirror activation was ready in the range",
        "routing-shares": "no telemetry minute in the range",
        "latency": "no telemetry minute in the range",
        "anomalies": "no anomaly in the range",
        "dead-letter": "nothing was dead-lettered in the range",
    }[name]
    return f"no rows: {why} ({table} has {count} rows, {_iso(int(oldest))} .. {_iso(int(newest))})."
