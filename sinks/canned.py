"""Canned analytics queries over the sink's tables (``loadcast query NAME``): their SQL,
help and bound parameters; :mod:`sinks.queries` runs them.

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
  telemetry names, the mirror's own included, so demand a ready mirror serves still counts;
  not the region's demand series ``{api}-demand-{region}``, which counts the same requests
  again), each score counting from its ``computed_at`` until the endpoint's next score or its
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
- ``tasks``: per task type (task API): tasks, succeeded, failed, cancelled, unfinished,
  retried tasks and retries, succeeded per second, wait (submit -> start of the attempt
  that counts) and run time p50/p95. A task's outcome is the terminal status of its highest
  attempt, first in log order, as the API decides it; statuses in the range only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CannedQuery:
    """One canned query: its name (the sub-command), help line, SQL and extra bound
    parameters."""

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
    -- a region's demand series counts requests its endpoints count too: not a share
    AND endpoint_id != concat(api, '-demand-', region)
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
    AND endpoint_id != concat(api, '-demand-', region)
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

# One row per task: its type, attempts, and the state that counts (the terminal status of
# its highest attempt, first in log order: the rule of processors.tasking.fold, which a
# stale result of an older attempt does not change).
TASKS = f"""
WITH per_task AS (
  SELECT task_id, any(task_type) AS task_type, max(attempt) AS attempts,
    min(submitted_at) AS submitted,
    argMinIf(tuple(state, started_at, at), tuple(-toInt64(attempt), _offset),
             state IN ('SUCCEEDED', 'FAILED', 'CANCELLED')) AS final
  FROM task_status FINAL
  WHERE at >= {_T0} AND at < {_T1}
  GROUP BY task_id
)
SELECT task_type, count() AS tasks,
  countIf(final.1 = 'SUCCEEDED') AS succeeded, countIf(final.1 = 'FAILED') AS failed,
  countIf(final.1 = 'CANCELLED') AS cancelled, countIf(final.1 = '') AS unfinished,
  countIf(attempts > 1) AS retried, sum(attempts - 1) AS retries,
  round(countIf(final.1 = 'SUCCEEDED') / greatest(1, dateDiff('millisecond',
    minIf(final.3, final.1 = 'SUCCEEDED'), maxIf(final.3, final.1 = 'SUCCEEDED')) / 1000), 3)
    AS succeeded_per_s,
  round(quantileIf(0.5)(dateDiff('millisecond', submitted, final.2) / 1000,
    final.1 = 'SUCCEEDED'), 3) AS wait_p50_s,
  round(quantileIf(0.95)(dateDiff('millisecond', submitted, final.2) / 1000,
    final.1 = 'SUCCEEDED'), 3) AS wait_p95_s,
  round(quantileIf(0.5)(dateDiff('millisecond', final.2, final.3) / 1000,
    final.1 = 'SUCCEEDED'), 3) AS run_p50_s,
  round(quantileIf(0.95)(dateDiff('millisecond', final.2, final.3) / 1000,
    final.1 = 'SUCCEEDED'), 3) AS run_p95_s
FROM per_task
GROUP BY task_type
ORDER BY task_type
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
        CannedQuery("tasks", "task API per type: outcomes, retries, throughput, wait and run "
                    "time percentiles", TASKS),
    )
}

#: The table (and event-time column) each canned query's rows come from.
SOURCES: dict[str, tuple[str, str]] = {
    "latency": ("telemetry", "window_start"),
    "forecast-accuracy": ("load_scores", "computed_at"),
    "routing-shares": ("telemetry", "window_start"),
    "mirror-lead-time": ("mirror_status", "at"),
    "anomalies": ("anomalies", "window_start"),
    "dead-letter": ("dead_letter", "at"),
    "tasks": ("task_status", "at"),
}
