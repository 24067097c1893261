"""Federated rounds on the embedded Tansu broker: 4 edge agents, the Faust coordinator
(``loadcast coordinator`` in its own process), the global-model repository, cold start,
privacy of what leaves the edges, and bad updates to dead-letter."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from processors.endpoint import EndpointModel, ProcessorConfig
from processors.federated.coldstart import ColdStartForecaster, warm_start
from processors.federated.params import family_of
from schemas.codec import Codec
from schemas.federated import global_from_record
from streams.edge.federated import EdgeTrainingConfig, FederatedEdgeAgent, build_federated_agent
from streams.edge.replay import read_trace
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.model_repo import ModelRepository, fetch_latest
from tests.conftest import ELB, REPO
from tests.kafka_helpers import read_topic

EDGES = 4
# 5-min rows: > min_samples model steps per edge and round, and by round 3 more than
# min_rows (50) rows with a day of history (the mature statistics).
ROWS_PER_ROUND = 130
MIN_SAMPLES = 100
STEP = 300


@pytest.fixture
def coordinator(kafka: KafkaSettings, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``loadcast coordinator`` as a real process; stopped with SIGTERM (killed if stuck)."""
    env = dict(os.environ, LOADCAST_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
               LOADCAST_KAFKA__TOPIC_PREFIX=kafka.topic_prefix,
               LOADCAST_KAFKA__PARTITIONS=str(kafka.partitions),
               LOADCAST_FEDERATED__APP_ID=f"coord-{kafka.topic_prefix.strip('.')}",
               LOADCAST_FEDERATED__MIN_UPDATES=str(EDGES))
    log = (tmp_path / "coordinator.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadcast", "coordinator", "--log-level", "info"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _edges(kafka: KafkaSettings, codec: Codec) -> list[FederatedEdgeAgent]:
    cfg = EdgeTrainingConfig(step_seconds=STEP, horizon=15, min_samples=MIN_SAMPLES,
                             lateness_seconds=0, resend_after=600)
    return [build_federated_agent(kafka, codec, agent_id=f"edge-{k}", region=f"r{k}",
                                  training=cfg, interval_seconds=STEP,
                                  host_stats=lambda: {"cpu_percent": 1.0,
                                                      "memory_percent": 1.0,
                                                      "net_in_bytes": 0, "net_out_bytes": 0})
            for k in range(EDGES)]


def _replay_rows(edge: FederatedEdgeAgent, rows: list[tuple[float, float]], name: str,
                 seen: set[float]) -> None:
    """Each row as one window of ``round(value / 4)`` requests, then the agent ticks."""
    for ts, value in rows:
        n = max(1, round(value / 4))
        for i in range(n):
            edge.record(name, 20.0 + i % 7, 200, at=ts + (i + 0.5) * STEP / n)
        seen.add(float(n))
        seen.add(n / STEP)  # the model-step rate the trainer learns from
        edge.tick(ts + STEP)


def _wait_version(edges: list[FederatedEdgeAgent], version: int, proc: subprocess.Popen[str],
                  timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the coordinator exited"
        for e in edges:
            e.federated.tick(timeout=0.2)
        if all(e.federated.trainer.base_version >= version for e in edges):
            return
    raise AssertionError(f"global version {version} did not reach every edge in {timeout}s: "
                         f"{[e.federated.trainer.base_version for e in edges]}")


def test_four_edges_three_rounds_then_a_new_endpoint_warm_starts(
    kafka: KafkaSettings, codec: Codec, coordinator: subprocess.Popen[str]
) -> None:
    trace = read_trace(ELB)
    rows = trace.rows
    per_edge = ROWS_PER_ROUND * 3
    # Disjoint data: edge k replays its own consecutive block of the trace.
    blocks = [rows[k * per_edge:(k + 1) * per_edge] for k in range(EDGES)]
    edges = _edges(kafka, codec)
    seen: set[float] = set()
    try:
        for r in range(3):
            for k, e in enumerate(edges):
                part = blocks[k][r * ROWS_PER_ROUND:(r + 1) * ROWS_PER_ROUND]
                _replay_rows(e, part, f"api-{k}", seen)
                assert e.federated.published == r + 1, "one update per edge and round"
            _wait_version(edges, r + 1, coordinator)
        # The repository holds versions 1..3, each from all 4 edges.
        family = edges[0].federated.trainer.family
        with ModelRepository(kafka, codec) as repo:
            repo.refresh(10)
            versions = repo.versions(family)
        assert [v.version for v in versions] == [1, 2, 3]
        assert all(v.participants == [f"edge-{k}" for k in range(EDGES)] for v in versions)
        assert all(v.num_samples >= EDGES * MIN_SAMPLES for v in versions)
        v3 = versions[-1]
        assert np.any(v3.params["weights"]) and v3.samples["cold_weights"] > 0
        # Edge side: a new endpoint at an edge starts from version 3.
        edge = edges[0]
        _replay_rows(edge, blocks[1][:3], "brand-new", seen)
        f = edge.federated.trainer.forecaster("brand-new")
        assert isinstance(f, ColdStartForecaster) and f.version == 3
        assert np.allclose(f.inner.weights[:, 1:], v3.params["cold_weights"][:, 1:], atol=1.0)
        # Processor side: what the worker does for a new endpoint.
        model = EndpointModel.create("new-endpoint", ProcessorConfig(step_seconds=STEP))
        assert family_of(model.forecaster) == family
        latest = fetch_latest(kafka, codec, family)
        assert latest is not None and latest.version == 3
        model.forecaster = warm_start(model.forecaster, latest)
        assert isinstance(model.forecaster, ColdStartForecaster)
        assert model.forecaster.version == 3
        # Privacy, on the real records: the schema has no telemetry field, and no value the
        # edges saw (request counts, rates) or endpoint name is in the bytes they sent.
        updates = read_topic(kafka.bootstrap_servers, topic_name(kafka, "model-updates"))
        assert len(updates) == EDGES * 3
        _assert_private([m.value() for m in updates], codec, seen)
    finally:
        for e in edges:
            e.close(10)


def _assert_private(values: list[bytes], codec: Codec, seen: set[float]) -> None:
    telemetry = {f["name"] for f in codec.schema("EndpointTelemetry")["fields"]}
    update_fields = {f["name"] for f in codec.schema("ModelUpdate")["fields"]}
    assert update_fields & telemetry == set(), update_fields & telemetry
    nested = {f["name"] for f in codec.schema("ModelParameter")["fields"]}
    assert not any("endpoint" in n or "latency" in n or "request" in n
                   for n in update_fields | nested)
    # Byte search only for doubles with a full mantissa (the rates): a "round" value like
    # 2.0 is mostly zero bytes and turns up by chance across neighbouring parameters.
    packed = [struct.pack("<d", v) for v in seen]
    raw = [b for b in packed if b.count(0) < 3]
    assert len(raw) > len(seen) // 3
    names = [b"api-0", b"api-1", b"api-2", b"api-3", b"brand-new"]
    for value in values:
        rec = codec.decode(value, "ModelUpdate")
        assert set(rec) == update_fields
        for needle in raw:
            assert needle not in value
        for name in names:
            assert name not in value
        numbers = [x for p in rec["delta"] + rec["scaler"] for x in p["values"]]
        assert not seen.intersection(numbers)
        # Statistics are sums over many rows (or held back): sent as a count with means and
        # covariances, never as single rows.
        stats = [p for p in rec["delta"] if p["name"].split("[")[0] in ("gram", "cold_gram")]
        assert stats and all(p["num_samples"] == 0 or p["num_samples"] >= 50 - 15
                             for p in stats)
        assert all(not any(p["values"]) for p in stats if p["num_samples"] == 0)
        assert rec["validation_mae"] is None or 0 <= rec["validation_mae"] < 5


def test_bad_updates_go_to_dead_letter_and_rounds_go_on(
    kafka: KafkaSettings, codec: Codec, coordinator: subprocess.Popen[str]
) -> None:
    """Garbage and a wrong-shape update on model-updates: dead-lettered / rejected with a
    reason; then 4 good updates still make version 1."""
    from schemas.federated import ModelDelta, update_to_record

    topic = topic_name(kafka, "model-updates")
    fam = "default-rls/300s/86400s/h15"
    p = RecordProducer(kafka, "test-bad-updates")
    p.produce(topic, b"\x00\x00\x00\x00\x10not avro", fam.encode())
    p.produce(topic, b"plain garbage", fam.encode())
    good = [ModelDelta(f"e{k}", fam, 1, 0, 50, {"weights": np.full((15, 25), 0.01 * k)})
            for k in range(EDGES)]
    for u in good:
        p.produce(topic, codec.encode("ModelUpdate", update_to_record(u, 1)), fam.encode())
    assert p.flush(10) == 0
    deadline = time.monotonic() + 60
    got: list[Any] = []
    while time.monotonic() < deadline and not got:
        assert coordinator.poll() is None
        got = read_topic(kafka.bootstrap_servers, topic_name(kafka, "global-model"), timeout=2)
    assert len(got) == 1
    g = global_from_record(codec.decode(got[0].value() or b"", "GlobalModel"))
    assert g.version == 1 and g.participants == [f"e{k}" for k in range(EDGES)]
    assert np.allclose(g.params["weights"], 0.015)  # mean of 0, .01, .02, .03
    dead = read_topic(kafka.bootstrap_servers, topic_name(kafka, "dead-letter"), timeout=10,
                      min_records=2)
    reasons = sorted(str(dict(m.headers() or [])["loadcast.reason"]) for m in dead)
    assert len(dead) == 2 and all(reasons), reasons


def test_model_list_and_show_read_the_repository(kafka: KafkaSettings, codec: Codec) -> None:
    from typer.testing import CliRunner

    from loadcast.cli import app
    from schemas.federated import GlobalState, global_to_record

    fam = "default-rls/60s/86400s/h15"
    p = RecordProducer(kafka, "test-model-cli")
    for v in (1, 2):
        g = GlobalState(fam, v, {"weights": np.full((15, 25), 0.1 * v)}, round=v,
                        participants=["a", "b"], num_samples=100 * v,
                        metrics={"validation_error": 0.2}, created_at=1_700_000_000_000)
        p.produce(topic_name(kafka, "global-model"),
                  codec.encode("GlobalModel", global_to_record(g)), fam.encode())
    p.produce(topic_name(kafka, "global-model"), b"not a model", fam.encode())
    assert p.flush(10) == 0
    env = {"LOADCAST_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix}
    runner = CliRunner()
    out = runner.invoke(app, ["model", "list"], env=env)
    assert out.exit_code == 0, out.output
    assert fam in out.output and "0.2000" in out.output
    show = runner.invoke(app, ["model", "show", fam], env=env)
    assert show.exit_code == 0, show.output
    import json

    doc = json.loads(show.output)
    assert doc["version"] == 2 and doc["params"]["weights"]["shape"] == [15, 25]
    missing = runner.invoke(app, ["model", "show", "nope", "--version", "9"], env=env)
    assert missing.exit_code == 1 and "no version" in missing.output


def test_cli_agent_federated_sends_model_updates_not_telemetry_values(
    kafka: KafkaSettings, codec: Codec
) -> None:
    """`loadcast agent --federated --replay`: it publishes telemetry *and* trains locally,
    sending ModelUpdate records (settings from the processor and federated sections)."""
    env = {**os.environ, "LOADCAST_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
           "LOADCAST_PROCESSOR__STEP_SECONDS": "300", "LOADCAST_FEDERATED__MIN_SAMPLES": "200"}
    cmd = [sys.executable, "-m", "loadcast", "agent", "--bootstrap", kafka.bootstrap_servers,
           "--region", "eu-west", "--replay", str(ELB), "--interval", "300", "--endpoints", "2",
           "--api", "orders", "--limit", "700", "--scale", "0.05", "--federated"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry"), min_records=1)
    updates = read_topic(kafka.bootstrap_servers, topic_name(kafka, "model-updates"),
                         min_records=1)
    records = [codec.decode(m.value() or b"", expect="ModelUpdate") for m in updates]
    assert records and all(r["edge_id"].startswith("eu-west-") for r in records)
    assert all(r["num_samples"] >= 200 for r in records)
