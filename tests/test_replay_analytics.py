"""The README's flow on a real broker: replay a trace, run the sink, query the analytics.

`loadcast agent --replay` re-times the trace to end now by default, so the sink's TTL keeps
the windows and `loadcast query latency` shows them; a query with nothing to show prints
its header and the likeliest reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from streams.edge.replay import ELB_TRACE, Trace, read_trace
from streams.kafka.settings import KafkaSettings

LIMIT = 120  # ten hours of the ELB trace: inside the query's default 24 h lookback


def loadcast(env: dict[str, str], *args: str,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadcast", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def env_for(kafka: KafkaSettings, dsn: str) -> dict[str, str]:
    return {**os.environ, "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
            "LOADCAST_KAFKA__PARTITIONS": "3", "LOADCAST_SINK__DSN": dsn,
            "LOADCAST_SINK__ADMIN_PORT": "0", "COLUMNS": "200"}


def test_readme_replay_then_sink_then_query_latency_shows_the_replayed_windows(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    env = env_for(kafka, f"chdb://{tmp_path}/ch")
    b = kafka.bootstrap_servers
    started = time.time()
    # The README's command, faster and shorter.
    agent = loadcast(env, "agent", "-b", b, "--region", "eu-west", "--replay", ELB_TRACE,
                     "--speedup", "600000", "--endpoints", "3", "--limit", str(LIMIT))
    assert agent.returncode == 0, agent.stderr
    sink = loadcast(env, "sink", "-b", b, "--until-idle", "3")
    assert sink.returncode == 0, sink.stderr
    assert "0 older than the TTL" in " ".join(sink.stderr.split())

    query = loadcast(env, "query", "latency", "--format", "json")
    assert query.returncode == 0, query.stderr
    rows: list[dict[str, Any]] = json.loads(query.stdout)
    trace = read_trace(ELB_TRACE, LIMIT)
    assert {r["endpoint_id"] for r in rows} == {f"default-eu-west-{i}" for i in (1, 2, 3)}
    assert sum(r["requests"] for r in rows) == sum(round(v) for _, v in trace.rows)
    # Re-timed: the replay ended now, and covers the trace's span before that.
    minutes = sorted(_epoch(r["minute"]) for r in rows)
    span = trace.rows[-1][0] + trace.step_seconds - trace.rows[0][0]
    assert started - 3600 < minutes[-1] <= time.time()
    assert minutes[-1] - minutes[0] >= span - 600
    err = " ".join(agent.stderr.split())
    assert f"over {LIMIT} of {LIMIT} rows" in err and "re-timed to end now" in err


def test_replay_summary_counts_the_rows_replayed_not_the_trace(kafka: KafkaSettings) -> None:
    env = env_for(kafka, "chdb://unused")
    agent = loadcast(env, "agent", "-b", kafka.bootstrap_servers, "--replay", ELB_TRACE,
                     "--speedup", "6000", "--duration", "2", "--keep-timestamps")
    assert agent.returncode == 0, agent.stderr
    m = re.search(r"over (\d+) of (\d+) rows", " ".join(agent.stderr.split()))
    assert m is not None, agent.stderr
    replayed, total = int(m.group(1)), int(m.group(2))
    assert total == len(read_trace(ELB_TRACE).rows) and 0 < replayed < total
    assert "original timestamps" in agent.stderr


def test_replay_progress_on_a_terminal() -> None:
    from loadcast.cli.agent import ReplayProgress

    class Edge:
        windows_published = 0

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    trace = Trace([(float(i * 300), 1.0) for i in range(50)], 300.0)
    edge = Edge()
    with ReplayProgress(console, trace, edge, 0) as p:
        for i in range(50):
            edge.windows_published += 3
            p.row(i, trace.rows[i][0], 10)
    text = out.getvalue()
    assert "50/50 rows" in text and "150 windows published" in text and "req/s" in text
    assert p.rows == 50


def _make_tables(dirs: dict[Path, list[int]]) -> None:
    """Migrate empty chDB directories and insert telemetry rows at the given times, in a
    separate process (only one process may hold a chDB directory)."""
    code = f"""
from sinks.db import connect
from sinks.ddl import TABLE_BY_NAME, migrate
from sinks.settings import SinkSettings
spec = TABLE_BY_NAME["telemetry"]
for path, times in {[(str(k), v) for k, v in dirs.items()]}:
    c = connect(SinkSettings(dsn="chdb://" + path))
    migrate(c, 90)
    rows = [("t", 0, i, 0, "e-1", "eu", "orders", "a", ts, ts + 5000, 5000, 3, {{}},
             1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 0, 0, 0, None, {{}}) for i, ts in enumerate(times)]
    if rows:
        c.insert("telemetry", list(zip(*rows)), column_names=spec.insert_columns,
                 column_oriented=True)
    c.close()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_empty_query_prints_its_header_and_the_likeliest_reason(tmp_path: Path) -> None:
    three_days_ago = (time.time_ns() // 1_000_000) - 3 * 86_400_000
    empty, old = tmp_path / "empty", tmp_path / "old"
    _make_tables({empty: [], old: [three_days_ago]})
    env = {**os.environ, "LOADCAST_SINK__DSN": f"chdb://{empty}", "COLUMNS": "200"}

    r = loadcast(env, "query", "latency")
    assert r.returncode == 0, r.stderr
    assert "endpoint_id" in r.stdout and "p99_ms" in r.stdout  # the table's header
    err = " ".join(r.stderr.split())
    assert err.startswith("no rows") and "telemetry table is empty" in err
    assert "loadcast sink" in err and "TTL" in err
    r = loadcast(env, "query", "forecast-accuracy", "--format", "csv")
    assert r.returncode == 0 and r.stdout.startswith("endpoint_id,api,horizon,")
    assert "load_scores table is empty" in " ".join(r.stderr.split())

    # Data only outside the lookback: the reason says where the newest row is.
    env["LOADCAST_SINK__DSN"] = f"chdb://{old}"
    r = loadcast(env, "query", "latency", "--since", "1h")
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "no rows in the lookback" in err and "3d ago" in err and "--since" in err


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
