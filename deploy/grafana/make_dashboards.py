"""Write the Grafana dashboards in ``deploy/grafana/dashboards/`` from this one file.

    python deploy/grafana/make_dashboards.py          # rewrite the JSON files
    python deploy/grafana/make_dashboards.py --check  # exit 1 when they are out of date

Prometheus panels use the metrics of every loadcast process (README.md, "Metrics") and
``kafka_consumergroup_lag`` from kafka-exporter; ClickHouse panels query the sink's tables
(``sinks/ddl.py``). ``tests/test_deploy.py`` checks the metric and label names against the
registry and runs every SQL query against an embedded chDB with the sink's schema.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
PROM = {"type": "prometheus", "uid": "prometheus"}
CH = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}
DB = "loadcast"

Panel = dict[str, Any]


class Layout:
    """Places panels left to right, ``per_row`` to a row of height ``h``."""

    def __init__(self) -> None:
        self.y = 0
        self.x = 0
        self.next_id = 1
        self.panels: list[Panel] = []

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: Panel, w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self.y += h
            self.x = 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        if self.x >= 24:
            self.x = 0
            self.y += h

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def prom(title: str, *exprs: tuple[str, str], unit: str = "short", kind: str = "timeseries",
         description: str = "") -> Panel:
    """A Prometheus panel; ``exprs`` are (PromQL, legend) pairs."""
    return {
        "type": kind, "title": title, "description": description, "datasource": PROM,
        "targets": [
            {"refId": chr(65 + i), "datasource": PROM, "expr": e, "legendFormat": legend}
            for i, (e, legend) in enumerate(exprs)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def sql(title: str, *queries: str, unit: str = "short", table: bool = False,
        description: str = "") -> Panel:
    """A ClickHouse panel (time series, or a table)."""
    return {
        "type": "table" if table else "timeseries", "title": title, "description": description,
        "datasource": CH,
        "targets": [
            {"refId": chr(65 + i), "datasource": CH, "editorType": "sql",
             "format": 1 if table else 0, "queryType": "table" if table else "timeseries",
             "rawSql": q.strip()}
            for i, q in enumerate(queries)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {} if table else {"legend": {"displayMode": "list", "placement": "bottom"},
                                     "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def ch_variable(name: str, query: str, *, multi: bool = True) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "query", "datasource": CH, "query": query,
            "definition": query, "refresh": 2, "multi": multi, "includeAll": multi,
            "sort": 1, "current": {}, "options": []}


def custom_variable(name: str, values: list[str]) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "custom", "query": ",".join(values),
            "multi": False, "includeAll": False,
            "current": {"text": values[0], "value": values[0]},
            "options": [{"text": v, "value": v, "selected": i == 0}
                        for i, v in enumerate(values)]}


def dashboard(uid: str, title: str, layout: Layout, variables: list[dict[str, Any]],
              description: str, time_from: str = "now-6h") -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description, "tags": ["loadcast"],
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": time_from, "to": "now"}, "timezone": "utc",
        "templating": {"list": variables}, "annotations": {"list": []},
        "panels": layout.panels,
    }


# --------------------------------------------------------------------------- pipeline health


def pipeline_health() -> dict[str, Any]:
    lay = Layout()
    lay.row("Lag")
    lay.add(prom(
        "Consumer-group lag (records)",
        ('sum by (consumergroup, topic) (kafka_consumergroup_lag{consumergroup=~"loadcast-.*"})',
         "{{consumergroup}} {{topic}}"),
        description="From kafka-exporter. loadcast-processor is the workers' group: add "
        "workers (up to the partition count) when it keeps growing.",
    ))
    lay.add(prom(
        "Sink lag: records not yet in ClickHouse",
        ("sum by (topic) (loadcast_sink_lag_records)", "{{topic}}"),
    ))
    lay.add(prom(
        "Worker snapshot age", ("max by (instance) (loadcast_processor_snapshot_age_seconds)",
                                "{{instance}}"), unit="s",
    ), w=8)
    lay.add(prom(
        "Partitions per worker", ("sum by (instance) (loadcast_processor_partitions)",
                                  "{{instance}}"),
    ), w=8)
    lay.add(prom(
        "Endpoint models per worker", ("sum by (instance) (loadcast_processor_endpoints)",
                                       "{{instance}}"),
    ), w=8)

    lay.row("Rates")
    lay.add(prom(
        "Edge agents: windows and requests /s",
        ("sum by (agent) (rate(loadcast_agent_windows_total[1m]))", "windows {{agent}}"),
        ("sum by (agent) (rate(loadcast_agent_requests_total[1m]))", "requests {{agent}}"),
        unit="ops",
    ), w=8)
    lay.add(prom(
        "Records produced /s by topic",
        ("sum by (topic) (rate(loadcast_producer_records_total[1m]))", "{{topic}}"), unit="ops",
    ), w=8)
    lay.add(prom(
        "Workers: windows applied, scores and anomalies /s",
        ("sum(rate(loadcast_processor_windows_total[1m]))", "windows"),
        ("sum(rate(loadcast_processor_replayed_total[1m]))", "replayed (already in a snapshot)"),
        ("sum(rate(loadcast_processor_scores_published_total[1m]))", "scores"),
        ("sum(rate(loadcast_processor_anomalies_total[1m]))", "anomalies"),
        unit="ops",
    ), w=8)
    lay.add(prom(
        "Sink: rows inserted /s by table",
        ("sum by (table) (rate(loadcast_sink_rows_total[1m]))", "{{table}}"), unit="ops",
    ), w=8)
    lay.add(prom(
        "Sink: insert time p95 by table",
        ("histogram_quantile(0.95, sum by (le, table) (rate(loadcast_sink_insert_seconds_bucket"
         "[5m])))", "{{table}}"), unit="s",
    ), w=8)
    lay.add(prom(
        "Sidecars: requests /s by outcome, upstream p99",
        ("sum by (api, outcome) (rate(loadcast_sidecar_requests_total[1m]))",
         "{{api}} {{outcome}}"),
        ("histogram_quantile(0.99, sum by (le, api) (rate(loadcast_sidecar_request_seconds_bucket"
         "[5m])))", "p99 s {{api}}"),
    ), w=8)

    lay.row("Dead letters and failures")
    lay.add(prom(
        "Dead-lettered /s by component and reason",
        ("sum by (reason) (rate(loadcast_processor_dead_letters_total[5m]))",
         "worker {{reason}}"),
        ("sum by (reason) (rate(loadcast_sink_dead_letters_total[5m]))", "sink {{reason}}"),
        ("sum by (reason) (rate(loadcast_sidecar_scores_skipped_total[5m]))",
         "sidecar {{reason}}"),
        ("sum by (reason) (rate(loadcast_consumer_skipped_total[5m]))", "consumer {{reason}}"),
        ("sum by (outcome) (rate(loadcast_coordinator_updates_total{outcome=\"dead_letter\"}"
         "[5m]))", "coordinator"),
        unit="ops",
    ))
    lay.add(sql(
        "Dead letters in ClickHouse by source topic and reason",
        f"""
SELECT source_topic, reason, count() AS records, max(at) AS latest, any(detail) AS example
FROM {DB}.dead_letter FINAL
WHERE $__timeFilter(at)
GROUP BY source_topic, reason
ORDER BY records DESC
LIMIT 100""",
        table=True,
    ))
    lay.add(prom(
        "Producers: failures, overflow, queued",
        ("sum by (client) (rate(loadcast_producer_delivery_failures_total[5m]))",
         "failed {{client}}"),
        ("sum by (client) (rate(loadcast_producer_overflow_total[5m]))", "overflow {{client}}"),
        ("sum by (client) (loadcast_producer_queued_records)", "queued {{client}}"),
    ), w=8)
    lay.add(prom(
        "Sink: ClickHouse up, insert failures /s",
        ("min(loadcast_sink_clickhouse_up)", "ClickHouse up"),
        ("sum(rate(loadcast_sink_insert_failures_total[5m]))", "insert failures"),
    ), w=8)
    lay.add(prom(
        "Processes up", ('sum by (job) (up{job=~"loadcast-.*"})', "{{job}}"),
    ), w=8)
    return dashboard("loadcast-pipeline", "loadcast: pipeline health", lay, [],
                     "Lag, throughput and dead letters of every loadcast process.", "now-1h")


# --------------------------------------------------------------------------- forecasts


def forecast_vs_actual() -> dict[str, Any]:
    lay = Layout()
    lay.row("Forecast vs actual (requests/s)")
    panel = sql(
        "$endpoint: actual and forecast at horizon $horizon",
        f"""
SELECT minute AS time, sum(requests) / 60 AS actual_rps
FROM {DB}.telemetry_1m
WHERE endpoint_id IN (${{endpoint:singlequote}}) AND $__timeFilter(minute)
GROUP BY time
ORDER BY time""",
        f"""
SELECT at AS time, argMax(mean, computed_at) AS forecast_rps,
  argMax(lower, computed_at) AS lower_90, argMax(upper, computed_at) AS upper_90
FROM {DB}.forecast_points FINAL
WHERE endpoint_id IN (${{endpoint:singlequote}}) AND horizon = ${{horizon}}
  AND $__timeFilter(at)
GROUP BY time
ORDER BY time""",
        unit="reqps",
        description="Actual: the endpoint's requests per minute / 60 (telemetry_1m). Forecast: "
        "the latest forecast made `horizon` steps ahead of each time, with its 90 % band.",
    )
    panel["repeat"] = "endpoint"
    panel["repeatDirection"] = "h"
    panel["maxPerRow"] = 2
    lay.add(panel, w=12, h=9)
    lay.row("Accuracy")
    lay.add(sql(
        "Absolute error by horizon (per minute)",
        f"""
SELECT minute AS time, concat('h=', toString(horizon)) AS horizon, avg(abs_error) AS mae
FROM {DB}.forecast_errors_1m FINAL
WHERE endpoint_id IN (${{endpoint:singlequote}}) AND $__timeFilter(at)
GROUP BY time, horizon
ORDER BY time""",
        unit="reqps",
    ))
    lay.add(sql(
        "90 % band coverage by horizon",
        f"""
SELECT minute AS time, concat('h=', toString(horizon)) AS horizon, avg(covered) AS coverage
FROM {DB}.forecast_errors_1m FINAL
WHERE endpoint_id IN (${{endpoint:singlequote}}) AND $__timeFilter(at)
GROUP BY time, horizon
ORDER BY time""",
        unit="percentunit",
    ))
    lay.row("Scores")
    lay.add(sql(
        "Load score per endpoint (higher = send more)",
        f"""
SELECT toStartOfMinute(computed_at) AS time, endpoint_id, avg(score) AS score
FROM {DB}.load_scores FINAL
WHERE endpoint_id IN (${{endpoint:singlequote}}) AND $__timeFilter(computed_at)
GROUP BY time, endpoint_id
ORDER BY time""",
    ))
    lay.add(sql(
        "Predicted utilization per endpoint",
        f"""
SELECT toStartOfMinute(computed_at) AS time, endpoint_id,
  max(predicted_utilization) AS predicted_utilization
FROM {DB}.load_scores FINAL
WHERE endpoint_id IN (${{endpoint:singlequote}}) AND $__timeFilter(computed_at)
GROUP BY time, endpoint_id
ORDER BY time""",
        unit="percentunit",
    ))
    variables = [
        ch_variable("endpoint", f"SELECT DISTINCT endpoint_id FROM {DB}.load_scores "
                                "ORDER BY endpoint_id"),
        custom_variable("horizon", ["1", "5", "15"]),
    ]
    return dashboard("loadcast-forecasts", "loadcast: forecast vs actual", lay, variables,
                     "Per endpoint: actual request rate against the forecast, errors, scores.")


# --------------------------------------------------------------------------- routing


def routing() -> dict[str, Any]:
    lay = Layout()
    lay.row("Weights")
    lay.add(prom(
        "Routing weight per endpoint (best = 1)",
        ('max by (api, endpoint) (loadcast_sidecar_weight{api=~"$api"})',
         "{{api}} {{endpoint}}"),
    ))
    lay.add(sql(
        "Mean weight given per endpoint (routing decisions)",
        f"""
SELECT toStartOfMinute(at) AS time, w.1 AS endpoint_id, avg(w.2) AS weight
FROM {DB}.routing_decisions FINAL
ARRAY JOIN CAST(weights, 'Array(Tuple(String, Float64))') AS w
WHERE kind = 'WEIGHTS' AND api IN (${{api:singlequote}}) AND $__timeFilter(at)
GROUP BY time, endpoint_id
ORDER BY time""",
    ))
    lay.row("Shares")
    lay.add(sql(
        "Traffic share per endpoint (telemetry)",
        f"""
SELECT minute AS time, endpoint_id,
  sum(requests) / sum(sum(requests)) OVER (PARTITION BY minute) AS share
FROM {DB}.telemetry_1m
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(minute)
GROUP BY minute, endpoint_id
ORDER BY time""",
        unit="percentunit",
        description="What each endpoint served, whatever the data plane (HAProxy or proxy).",
    ))
    lay.add(prom(
        "Routed share per endpoint (built-in proxy)",
        ('sum by (api, endpoint) (rate(loadcast_sidecar_requests_total{api=~"$api"}[1m])) '
         '/ on (api) group_left sum by (api) (rate(loadcast_sidecar_requests_total'
         '{api=~"$api"}[1m]))', "{{api}} {{endpoint}}"),
        unit="percentunit",
    ))
    lay.row("Policy and health")
    lay.add(prom(
        "Scores stale (fallback policy routing)",
        ('max by (api) (loadcast_sidecar_scores_stale{api=~"$api"})', "{{api}}"),
        ('sum by (api) (increase(loadcast_sidecar_stale_fallbacks_total{api=~"$api"}[5m]))',
         "fallbacks /5m {{api}}"),
    ), w=8)
    lay.add(prom(
        "Active policy",
        ('max by (api, policy) (loadcast_sidecar_policy_active{api=~"$api"}) == 1',
         "{{api}} {{policy}}"),
    ), w=8)
    lay.add(prom(
        "Shed share, weight changes, HAProxy writes",
        ('max by (api) (loadcast_sidecar_shed_share{api=~"$api"})', "shed {{api}}"),
        ('sum by (api) (rate(loadcast_sidecar_weight_changes_total{api=~"$api"}[5m]))',
         "weight changes /s {{api}}"),
        ("sum by (outcome) (rate(loadcast_sidecar_haproxy_updates_total[5m]))",
         "HAProxy writes /s {{outcome}}"),
    ), w=8)
    lay.add(prom(
        "Ejected endpoints, retries, rejections",
        ("max by (endpoint) (loadcast_sidecar_endpoint_ejected)", "ejected {{endpoint}}"),
        ('sum by (api) (rate(loadcast_sidecar_retries_total{api=~"$api"}[5m]))',
         "retries /s {{api}}"),
        ('sum by (api, reason) (rate(loadcast_sidecar_rejected_total{api=~"$api"}[5m]))',
         "rejected /s {{api}} {{reason}}"),
    ), w=12)
    lay.add(sql(
        "Stale-score fraction of routing decisions",
        f"""
SELECT toStartOfMinute(at) AS time, api, avg(stale) AS stale_fraction
FROM {DB}.routing_decisions FINAL
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(at)
GROUP BY time, api
ORDER BY time""",
        unit="percentunit",
    ), w=12)
    variables = [ch_variable("api", f"SELECT DISTINCT api FROM {DB}.telemetry_1m ORDER BY api")]
    return dashboard("loadcast-routing", "loadcast: routing weights and shares", lay, variables,
                     "What the sidecars do with the scores: weights, shares, policy, staleness.")


# --------------------------------------------------------------------------- mirrors


def mirrors() -> dict[str, Any]:
    lay = Layout()
    lay.row("Commands")
    lay.add(sql(
        "Mirror commands per minute by region and action",
        f"""
SELECT toStartOfMinute(issued_at) AS time, concat(region, ' ', action) AS command,
  count() AS commands
FROM {DB}.mirror_commands FINAL
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(issued_at)
GROUP BY time, command
ORDER BY time""",
    ))
    lay.add(sql(
        "Desired mirror instances by region",
        f"""
SELECT issued_at AS time, region, max(desired_instances) AS desired_instances
FROM {DB}.mirror_commands FINAL
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(issued_at)
GROUP BY time, region
ORDER BY time""",
    ))
    lay.add(prom(
        "Planner: commands issued and inputs /s",
        ("sum by (action) (rate(loadcast_planner_commands_total[5m]))", "commands {{action}}"),
        ("sum by (topic, outcome) (rate(loadcast_planner_records_total[5m]))",
         "{{topic}} {{outcome}}"),
        unit="ops",
    ), w=8)
    lay.add(prom(
        "Planned activation time",
        ('max by (api) (loadcast_planner_activation_seconds{api=~"$api"})', "{{api}}"),
        unit="s", description="How long before the demand crossing the planner acts.",
    ), w=8)
    lay.add(prom(
        "Executors: commands by outcome, instances",
        ("sum by (executor, outcome) (rate(loadcast_executor_commands_total[5m]))",
         "{{executor}} {{outcome}}"),
        ('sum by (executor, api) (loadcast_executor_instances{api=~"$api"})',
         "instances {{executor}} {{api}}"),
    ), w=8)
    lay.row("Mirrors")
    lay.add(sql(
        "Latest state per mirror",
        f"""
SELECT api, region, executor_id, argMax(state, at) AS state, max(at) AS since,
  argMax(instance_url, at) AS instance_url, argMax(capacity_rps, at) AS capacity_rps,
  argMax(reason, at) AS reason
FROM {DB}.mirror_status FINAL
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(at)
GROUP BY api, region, executor_id
ORDER BY api, region, executor_id""",
        table=True,
    ))
    lay.add(sql(
        "Status reports per minute by state",
        f"""
SELECT toStartOfMinute(at) AS time, state, count() AS reports
FROM {DB}.mirror_status FINAL
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(at)
GROUP BY time, state
ORDER BY time""",
    ))
    lay.add(sql(
        "Demand vs central capacity (scores of mirrored APIs)",
        f"""
SELECT toStartOfMinute(computed_at) AS time, api,
  sum(current_rps) AS current_rps, sum(capacity_rps) AS central_capacity_rps
FROM {DB}.load_scores FINAL
WHERE api IN (${{api:singlequote}}) AND $__timeFilter(computed_at)
GROUP BY time, api
ORDER BY time""",
        unit="reqps",
        description="A mirror should be READY before current_rps crosses central capacity.",
    ), w=24)
    variables = [ch_variable("api", f"SELECT DISTINCT api FROM {DB}.mirror_commands "
                                    f"UNION DISTINCT SELECT DISTINCT api FROM {DB}.load_scores")]
    return dashboard("loadcast-mirrors", "loadcast: mirrors", lay, variables,
                     "Mirror commands from the planner and what the edge executors report.")


DASHBOARDS = {
    "pipeline-health.json": pipeline_health,
    "forecast-vs-actual.json": forecast_vs_actual,
    "routing.json": routing,
    "mirrors.json": mirrors,
}


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(make(), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        stale = [n for n, text in files.items()
                 if not (OUT / n).is_file() or (OUT / n).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)} (run {Path(__file__).name})")
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
