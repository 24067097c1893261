"""Canned analytics queries over the sink's tables (``loadcast query NAME``).

Every query takes the same bound parameters (never pasted into SQL): ``since_ms`` and
``until_ms`` (epoch ms, half-open range), ``endpoint`` and ``api`` ('' = all). Results are
:class:`QueryResult` (column names + rows of plain JSON-able values).

- ``latency``: per endpoint per minute: requests, errors, p50/p95/p99 (the request-weighted
  mean of the windows' quantiles; exact when one window spans the minute) and max, from the
  ``telemetry_1m`` rollup.
- ``forecast-accuracy``: per endpoint and horizon: MAE, MASE and 90 % band coverage. A
  forecast point (``at``, from a LoadScore made at ``computed_at``) meets its actual, the
  endpoint's requests over the windows starting in ``[at, at + step_seconds)`` divided by
  ``step_seconds``, once telemetry of that endpoint reaches past the step's end; points
  whose step has no telemetry window are left out. **MASE denominator**: the mean absolute
  error of the one-step-back naive forecast (y[t-1] predicts y[t]) over the endpoint's
  actual series in the range: its complete steps of ``step_seconds`` aligned to the epoch,
  pairs of adjacent steps only. NULL when that error is 0 or undefined.
- ``routing-shares``: per api, minute and endpoint: requests and share of the api's
  requests (telemetry), share of sampled routed requests (REQUEST decisions), mean weight
  given (WEIGHTS decisions) and the fraction of decisions made on stale scores
  (``stale_fraction`` > 0 marks stale-score periods).
- ``mirror-lead-time``: per mirror activation (a command with a READY status, ready in the
  range): when the mirror was ready, when the region's demand crossed central capacity, and
  the lead time ``lead_seconds`` = crossing - ready (positive = ready before the crossing).
  **Regional demand** is what the planner and the traffic director add up
  (``processors.mirroring.DemandTable``): the sum of ``current_rps`` of the latest
  LoadScore of every endpoint of the command's api *and region* (the endpoints a region's
  telemetry names, the mirror's own included, so demand a ready mirror serves still counts),
  each score counting from its ``computed_at`` until the endpoint's next score or its
  ``valid_until``, whichever is first. It is evaluated at every score time; the crossing is
  the ``computed_at`` of the score that took it over capacity, i.e. when the control plane
  saw it (one telemetry interval plus the scoring delay after the requests, so the lead is
  generous by about that much). **Central capacity** is the command's
  ``central_capacity_rps`` (what the planner compared against), else the summed
  ``capacity_rps`` of the counting scores of the region's central endpoints (not of its
  mirrors, which the director names ``{api}-mirror-{region}-...``). **Which crossing:** if
  demand was over capacity at the command's first status, the start of that over-capacity
  run (searched back ``lookback_s``; began earlier: no crossing, ``note`` says so); else
  the first crossing after it and before the next command of that (api, region). No
  crossing: ``crossed_at`` and ``lead_seconds`` are NULL and ``note`` says why.
  ``demand_rps`` and ``capacity_rps`` are the values at the crossing.
- ``anomalies``: anomalies in the range, newest first.
- ``dead-letter``: dead letters per source topic and reason, with the latest detail.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

MAX_ROWS = 100_000


class QueryError(ValueError):
    """A query request that cannot be run as asked (unknown name, bad parameter)."""


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


@dataclass(frozen=True)
class CannedQuery:
    name: str
    help: str
    sql: str
    extra: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name: (CH type, default)


_FILTERS = """({endpoint:String} = '' OR endpoint_id = {endpoint:String})
  AND ({api:String} = '' OR api = {api:String})"""
_T0 = "fromUnixTimestamp64Milli({since_ms:Int64}, 'UTC')"
_T1 = "fromUnixTimestamp64Milli({until_ms:Int64}, 'UTC')"

LATENCY = f"""
SELECT endpoint_id, any(api) AS api, minute,
  sum(windows) AS windows, sum(requests) AS requests,
  arraySum(mapValues(sumMap(errors))) AS errors,
  round(sum(p50_x_requests) / nullIf(sum(requests), 0), 3) AS p50_ms,
  round(sum(p95_x_requests) / nullIf(sum(requests), 0), 3) AS p95_ms,
  round(sum(p99_x_requests) / nullIf(sum(requests), 0), 3) AS p99_ms,
  max(latency_max_ms) AS max_ms
FROM telemetry_1m
WHERE minute >= toStartOfMinute({_T0}) AND minute < {_T1} AND {_FILTERS}
GROUP BY endpoint_id, minute
ORDER BY endpoint_id, minute
SETTINGS prefer_column_name_to_alias = 1
"""

FORECAST_ACCURACY = f"""
WITH
pts AS (
  SELECT endpoint_id, api, horizon, at, computed_at, mean, lower, upper, step_seconds
  FROM forecast_points FINAL
  WHERE at >= {_T0} AND at < {_T1} AND {_FILTERS}
),
tel AS (
  SELECT endpoint_id, window_start, window_end, request_count FROM telemetry FINAL
  WHERE endpoint_id IN (SELECT endpoint_id FROM pts)
    AND window_start >= {_T0} - INTERVAL 1 DAY AND window_start < {_T1} + INTERVAL 1 DAY
),
last AS (SELECT endpoint_id, max(window_end) AS last_end FROM tel GROUP BY endpoint_id),
steps AS (SELECT endpoint_id, any(step_seconds) AS step FROM pts GROUP BY endpoint_id),
actuals AS (
  SELECT p.endpoint_id AS endpoint_id, any(p.api) AS api, p.horizon AS horizon,
    p.mean AS mean, p.lower AS lower, p.upper AS upper,
    sum(t.request_count) / p.step_seconds AS actual
  FROM pts AS p
  INNER JOIN tel AS t ON t.endpoint_id = p.endpoint_id AND t.window_start >= p.at
    AND t.window_start < p.at + toIntervalSecond(p.step_seconds)
  INNER JOIN last AS l ON l.endpoint_id = p.endpoint_id
  WHERE p.at + toIntervalSecond(p.step_seconds) <= l.last_end
  GROUP BY p.endpoint_id, p.horizon, p.at, p.computed_at, p.mean, p.lower, p.upper,
    p.step_seconds
),
buckets AS (
  SELECT t.endpoint_id AS endpoint_id, any(s.step) AS step,
    intDiv(toUnixTimestamp64Milli(t.window_start), s.step * 1000) * s.step * 1000 AS b_ms,
    sum(t.request_count) / any(s.step) AS y, any(l.last_end) AS last_end
  FROM tel AS t
  INNER JOIN steps AS s ON s.endpoint_id = t.endpoint_id
  INNER JOIN last AS l ON l.endpoint_id = t.endpoint_id
  WHERE t.window_start >= {_T0} AND t.window_start < {_T1}
  GROUP BY endpoint_id, b_ms
),
naive AS (
  SELECT endpoint_id, avgIf(abs(y - prev_y), prev_b = b_ms - step * 1000) AS naive_mae
  FROM (
    SELECT endpoint_id, step, b_ms, y,
      lagInFrame(y) OVER w AS prev_y, lagInFrame(b_ms) OVER w AS prev_b
    FROM buckets
    WHERE b_ms + step * 1000 <= toUnixTimestamp64Milli(last_end)
    WINDOW w AS (PARTITION BY endpoint_id ORDER BY b_ms
                 ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
  )
  GROUP BY endpoint_id
)
SELECT a.endpoint_id AS endpoint_id, any(a.api) AS api, a.horizon AS horizon,
  count() AS points,
  round(avg(abs(a.mean - a.actual)), 6) AS mae,
  round(avg(abs(a.mean - a.actual)) / nullIf(any(n.naive_mae), 0), 6) AS mase,
  round(avg(a.actual >= a.lower AND a.actual <= a.upper), 6) AS coverage,
  round(avg(a.actual), 6) AS mean_actual_rps
FROM actuals AS a
LEFT JOIN naive AS n ON n.endpoint_id = a.endpoint_id
GROUP BY a.endpoint_id, a.horizon
ORDER BY a.endpoint_id, a.horizon
"""

ROUTING_SHARES = f"""
WITH
traffic AS (
  SELECT api, minute, endpoint_id, sum(requests) AS requests
  FROM telemetry_1m
  WHERE minute >= toStartOfMinute({_T0}) AND minute < {_T1} AND {_FILTERS}
  GROUP BY api, minute, endpoint_id
),
decisions AS (
  SELECT api, toStartOfMinute(at) AS minute, count() AS decisions,
    avg(stale) AS stale_fraction
  FROM routing_decisions FINAL
  WHERE at >= {_T0} AND at < {_T1} AND ({{api:String}} = '' OR api = {{api:String}})
  GROUP BY api, minute
),
routed AS (
  SELECT api, toStartOfMinute(at) AS minute, assumeNotNull(endpoint_id) AS endpoint_id,
    count() AS routed
  FROM routing_decisions FINAL
  WHERE kind = 'REQUEST' AND endpoint_id IS NOT NULL AND at >= {_T0} AND at < {_T1}
  GROUP BY api, minute, endpoint_id
),
weights AS (
  SELECT api, toStartOfMinute(at) AS minute, w.1 AS endpoint_id, avg(w.2) AS mean_weight
  FROM routing_decisions FINAL ARRAY JOIN CAST(weights, 'Array(Tuple(String, Float64))') AS w
  WHERE kind = 'WEIGHTS' AND at >= {_T0} AND at < {_T1}
  GROUP BY api, minute, endpoint_id
)
SELECT t.api AS api, t.minute AS minute, t.endpoint_id AS endpoint_id, t.requests AS requests,
  round(t.requests / nullIf(sum(t.requests) OVER (PARTITION BY t.api, t.minute), 0), 6)
    AS share,
  round(r.routed / nullIf(sum(r.routed) OVER (PARTITION BY t.api, t.minute), 0), 6)
    AS routed_share,
  round(w.mean_weight, 6) AS mean_weight,
  round(d.stale_fraction, 6) AS stale_fraction
FROM traffic AS t
LEFT JOIN routed AS r ON r.api = t.api AND r.minute = t.minute AND r.endpoint_id = t.endpoint_id
LEFT JOIN weights AS w ON w.api = t.api AND w.minute = t.minute AND w.endpoint_id = t.endpoint_id
LEFT JOIN decisions AS d ON d.api = t.api AND d.minute = t.minute
ORDER BY api, minute, endpoint_id
SETTINGS join_use_nulls = 1
"""

MIRROR_LEAD_TIME = f"""
WITH
status AS (SELECT * FROM mirror_status FINAL WHERE ({{api:String}} = '' OR api = {{api:String}})),
commands AS (
  SELECT api, region, command_id, min(at) AS first_status_at,
    minIf(at, state = 'READY') AS ready_at, anyIf(executor_id, state = 'READY') AS executor_id,
    countIf(state = 'READY') > 0 AS was_ready,
    leadInFrame(toNullable(min(at))) OVER (PARTITION BY api, region ORDER BY min(at)
      ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING) AS next_status_at
  FROM status
  GROUP BY api, region, command_id
),
activations AS (
  SELECT c.api AS api, c.region AS region, c.command_id AS command_id,
    c.executor_id AS executor_id, c.first_status_at AS first_status_at,
    c.ready_at AS ready_at,
    c.first_status_at - toIntervalSecond({{lookback_s:UInt32}}) AS look_from,
    ifNull(c.next_status_at, toDateTime64('2299-12-31 00:00:00', 3, 'UTC')) AS look_until,
    m.capacity AS command_capacity
  FROM commands AS c
  LEFT JOIN (SELECT command_id, any(central_capacity_rps) AS capacity
             FROM mirror_commands FINAL GROUP BY command_id) AS m
    ON m.command_id = c.command_id
  WHERE c.was_ready AND c.ready_at >= {_T0} AND c.ready_at < {_T1}
),
-- Each score holds its endpoint's current_rps (and, for non-mirror endpoints, its
-- capacity_rps) from computed_at until gone_at: the endpoint's next score or valid_until.
scores AS (
  SELECT api, region, computed_at,
    if(isFinite(current_rps), current_rps, 0) AS rps,
    if(startsWith(endpoint_id, concat(api, '-mirror-', region, '-'))
       OR NOT isFinite(capacity_rps), 0, capacity_rps) AS cap,
    greatest(computed_at, least(valid_until, ifNull(leadInFrame(toNullable(computed_at))
      OVER (PARTITION BY api, region, endpoint_id ORDER BY computed_at
            ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING), valid_until))) AS gone_at
  FROM load_scores FINAL
  WHERE (api, region) IN (SELECT api, region FROM activations)
    AND computed_at >= (SELECT min(look_from) FROM activations) - INTERVAL 1 HOUR
),
-- Regional demand and summed capacity after every score (+) and expiry (-) event.
series AS (
  SELECT api, region, t,
    round(sum(d_rps) OVER w, 6) AS demand, round(sum(d_cap) OVER w, 6) AS capacity_sum
  FROM (
    SELECT api, region, t, sum(d_rps) AS d_rps, sum(d_cap) AS d_cap
    FROM (
      SELECT api, region, computed_at AS t, rps AS d_rps, cap AS d_cap FROM scores
      UNION ALL
      SELECT api, region, gone_at AS t, -rps AS d_rps, -cap AS d_cap FROM scores
    )
    GROUP BY api, region, t
  )
  WINDOW w AS (PARTITION BY api, region ORDER BY t ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
),
-- Per activation: the state at look_from, then every event up to the next command.
points AS (
  SELECT a.command_id AS command_id, a.look_from AS t,
    ifNull(s.demand, 0) AS demand, ifNull(a.command_capacity, ifNull(s.capacity_sum, 0)) AS cap
  FROM activations AS a
  ASOF LEFT JOIN series AS s ON s.api = a.api AND s.region = a.region AND s.t <= a.look_from
  UNION ALL
  SELECT a.command_id AS command_id, s.t AS t, s.demand AS demand,
    ifNull(a.command_capacity, s.capacity_sum) AS cap
  FROM activations AS a
  INNER JOIN series AS s ON s.api = a.api AND s.region = a.region
  WHERE s.t > a.look_from AND s.t < a.look_until
),
per AS (
  SELECT command_id, arraySort(x -> x.1, groupArray((t, demand, cap))) AS pts,
    arrayMap(x -> x.2 > x.3, pts) AS over
  FROM points GROUP BY command_id
),
-- Over capacity at the first status: the start of that run (the first over point after
-- the last under one); none under within the look-back: unknown. Else the next crossing.
found AS (
  SELECT a.*, p.pts AS pts, p.over AS over,
    arrayLastIndex(x -> x.1 <= a.first_status_at, pts) AS i_s,
    over[i_s] AS over_at_start,
    arrayLastIndex((x, o) -> x.1 <= a.first_status_at AND NOT o, pts, over) AS i_under,
    if(over_at_start AND i_under = 0, 0,
       arrayFirstIndex((o, i) -> o AND i > i_under, over, arrayEnumerate(over))) AS i_cross
  FROM activations AS a INNER JOIN per AS p ON p.command_id = a.command_id
)
SELECT api, region, command_id, executor_id, first_status_at, ready_at,
  if(i_cross = 0, NULL, pts[i_cross].1) AS crossed_at,
  if(i_cross = 0, NULL, round(dateDiff('millisecond', ready_at, pts[i_cross].1) / 1000, 3))
    AS lead_seconds,
  if(i_cross = 0, NULL, round(pts[i_cross].2, 3)) AS demand_rps,
  round(if(i_cross = 0, pts[i_s].3, pts[i_cross].3), 3) AS capacity_rps,
  multiIf(over_at_start AND i_under = 0,
          'demand already over capacity for the whole look-back before the command',
          i_cross = 0, 'demand did not cross capacity (before the next command, if any)',
          pts[i_cross].1 >= ready_at, 'mirror ready before demand crossed capacity',
          'mirror ready after demand crossed capacity') AS note
FROM found
ORDER BY ready_at
SETTINGS join_use_nulls = 1
"""

ANOMALIES = f"""
SELECT window_start, detected_at, endpoint_id, api, region, round(score, 6) AS score,
  round(threshold, 6) AS threshold, detector
FROM anomalies FINAL
WHERE window_start >= {_T0} AND window_start < {_T1} AND {_FILTERS}
ORDER BY window_start DESC, endpoint_id
LIMIT {{limit:UInt32}}
"""

DEAD_LETTER = f"""
SELECT source_topic, reason, count() AS records, min(at) AS first_at, max(at) AS last_at,
  argMax(detail, at) AS latest_detail
FROM dead_letter FINAL
WHERE at >= {_T0} AND at < {_T1}
GROUP BY source_topic, reason
ORDER BY records DESC, source_topic, reason
"""

CANNED: dict[str, CannedQuery] = {
    q.name: q
    for q in (
        CannedQuery("latency", "p50/p95/p99 per endpoint per minute", LATENCY),
        CannedQuery(
            "forecast-accuracy",
            "MAE and MASE (naive one-step-back denominator) per endpoint and horizon, "
            "90 % band coverage",
            FORECAST_ACCURACY,
        ),
        CannedQuery(
            "routing-shares",
            "traffic share per endpoint per minute, routed share, weights, stale-score "
            "fraction",
            ROUTING_SHARES,
        ),
        CannedQuery(
            "mirror-lead-time",
            "per mirror activation: ready time, regional demand crossing central capacity, "
            "lead time",
            MIRROR_LEAD_TIME,
            {"lookback_s": ("UInt32", 3600)},
        ),
        CannedQuery("anomalies", "anomalies, newest first", ANOMALIES,
                    {"limit": ("UInt32", 1000)}),
        CannedQuery("dead-letter", "dead letters per source topic and reason", DEAD_LETTER),
    )
}

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
    from sinks.sqlguard import check_sql

    if not sql.strip():
        raise QueryError("empty SQL")
    check_sql(sql)
    result = _result(client, sql, params or {}, settings={"readonly": 1})
    if not result.rows:
        result.note = "no rows"
    return result


#: The table (and event-time column) each canned query's rows come from.
_SOURCES: dict[str, tuple[str, str]] = {
    "latency": ("telemetry", "window_start"),
    "forecast-accuracy": ("load_scores", "computed_at"),
    "routing-shares": ("telemetry", "window_start"),
    "mirror-lead-time": ("mirror_status", "at"),
    "anomalies": ("anomalies", "window_start"),
    "dead-letter": ("dead_letter", "at"),
}


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
    table, column = _SOURCES[name]
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
