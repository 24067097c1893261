"""The traffic director's rule (pure), the sidecar hooks over real HTTP (bad region header,
a mirror learned from mirror-status on the broker), and the planner's Kafka side (restore
from its own commands, bad input to dead-letter)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Producer
from pydantic import ValidationError

from processors.apps.mirror_settings import MirrorSettings
from processors.apps.planner import Planner
from processors.mirroring import BundleSpec
from processors.signing import generate_keypair
from schemas.codec import Codec
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.app import Sidecar
from streams.sidecar.config import SidecarSettings, Upstream
from streams.sidecar.director import MirrorDirector
from streams.sidecar.router import Router
from streams.sidecar.testing import BackendProcess
from tests.kafka_helpers import read_topic

DIGEST = "sha256:" + "cd" * 32


def score(now_ms: int, rps: float, region: str = "eu", capacity: float = 100.0
          ) -> dict[str, Any]:
    return {"endpoint_id": f"orders-{region}-1", "api": "orders", "region": region,
            "computed_at": now_ms, "valid_until": now_ms + 5000, "capacity_rps": capacity,
            "current_rps": rps, "step_seconds": 1,
            "forecast": [{"horizon": h, "at": now_ms + 1000 * h, "mean": rps, "lower": rps,
                          "upper": rps} for h in range(1, 6)]}


def status(state: str, url: str, region: str = "eu", capacity: float | None = 10.0
           ) -> dict[str, Any]:
    return {"api": "orders", "region": region, "state": state, "at": 0, "instance_url": url,
            "capacity_rps": capacity, "executor_id": "ex", "command_id": "c", "sequence": 1}


def test_director_rule() -> None:
    router = Router([Upstream(id="c1", url="http://127.0.0.1:9001", api="orders")])
    route = router.routes["orders"]
    d = MirrorDirector(region="central", lookahead_s=5.0, headroom=0.5,
                       mirror_hosts=["127.0.0.1"])
    now = int(time.time() * 1000)
    d.apply_statuses([status("READY", "http://127.0.0.1:9100")], now)
    d.apply_scores([score(now, 50.0)], now)
    assert d.choose(route, "eu", 0.0, 0) is None  # demand under central capacity: central
    d.apply_scores([score(now + 1, 130.0)], now)
    ep = d.choose(route, "eu", 0.0, 0)
    assert ep is not None and ep.url == "http://127.0.0.1:9100"
    assert d.choose(route, None, 0.0, 0) is None  # the sidecar's own region has no mirror
    assert d.choose(route, "us", 0.0, 0) is None
    # Hysteresis: 90 rps (between 0.8 and 1.0 x capacity) keeps the mirror; 70 leaves it.
    d.apply_scores([score(now + 2, 90.0)], now)
    assert d.choose(route, "eu", 0.0, 0) is not None
    d.apply_scores([score(now + 3, 70.0)], now)
    assert d.choose(route, "eu", 0.0, 0) is None
    # Headroom: 0.5 x 10 rps of mirror capacity: past 5 requests in a second, central.
    d.apply_scores([score(now + 4, 200.0)], now)
    picks = [d.choose(route, "eu", 0.0, 7) for _ in range(7)]
    assert [p is not None for p in picks] == [True] * 5 + [False] * 2
    assert d.choose(route, "eu", 0.0, 8) is None  # the last second was full
    assert d.choose(route, "eu", 0.0, 9) is not None  # and the one before that was empty
    # Fallback: central down, demand low, a mirror ready: the mirror rather than a 503.
    d.apply_scores([score(now + 5, 10.0)], now)
    assert d.choose(route, "eu", 0.0, 9) is None
    fb = d.fallback(route, "eu", 0.0, 9)
    assert fb is not None and fb.url == "http://127.0.0.1:9100"
    # DRAINING removes it at once; scores going stale send everything central.
    d.apply_scores([score(now + 6, 200.0)], now)
    d.apply_statuses([status("DRAINING", "http://127.0.0.1:9100")], now)
    assert d.choose(route, "eu", 0.0, 10) is None and d.mirrors == {}
    d.apply_statuses([status("READY", "http://127.0.0.1:9101", capacity=None)], now)
    assert d.choose(route, "eu", 0.0, 10) is not None
    d.tick(now + 60_000)
    assert d.choose(route, "eu", 0.0, 10) is None
    assert d.view()["orders/eu"]["mirrors"]["http://127.0.0.1:9101"]["capacity_rps"] is None


def produce_overload(p: Producer, kafka: KafkaSettings, codec: Codec) -> None:
    """A fresh score of ``orders-eu-1``: healthy, forecast at 1.5× its 100 rps capacity."""
    now = int(time.time() * 1000)
    p.produce(topic_name(kafka, "load-scores"),
              codec.encode("LoadScore", {**score(now, 150.0, capacity=100.0),
                                         "score": 0.5, "predicted_utilization": 1.5,
                                         "latency_p99_ms": 5.0, "error_rate": 0.0,
                                         "valid_until": now + 60_000}), b"orders-eu-1")

@pytest.mark.asyncio
async def test_sidecar_routes_region_to_mirror_from_the_topics(
    kafka: KafkaSettings, codec: Codec
) -> None:
    with BackendProcess({"central-1": 0, "mirror-1": 0}) as b:
        settings = SidecarSettings(
            upstreams=[{"id": "central-1", "url": b.urls["central-1"], "api": "orders"}],
            listen_port=0, admin_port=0, region="central", mirror_lookahead_s=5.0,
            mirror_hosts=["127.0.0.1"])
        sc = Sidecar(settings, kafka, codec=codec)
        await sc.start()
        try:
            p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
            produce_overload(p, kafka, codec)
            p.produce(topic_name(kafka, "mirror-status"), codec.encode(
                "MirrorStatus", status("READY", b.urls["mirror-1"], capacity=1000.0)), b"eu")
            assert p.flush(10) == 0
            port = sc.port
            async with aiohttp.ClientSession() as cs:
                async def who(headers: dict[str, str]) -> tuple[int, str]:
                    async with cs.get(f"http://127.0.0.1:{port}/x", headers=headers) as r:
                        return r.status, await r.text()

                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if (await who({"X-Loadcast-Region": "eu"}))[1] == "mirror-1":
                        break
                    await asyncio.sleep(0.1)
                assert await who({"X-Loadcast-Region": "eu"}) == (200, "mirror-1")
                assert await who({}) == (200, "central-1")  # the sidecar's own region
                assert await who({"X-Loadcast-Region": "us"}) == (200, "central-1")
                status_code, body = await who({"X-Loadcast-Region": "bad region!"})
                assert status_code == 400 and "X-Loadcast-Region must be a region name" in body
            assert "orders/eu" in sc.health()["mirrors"]
        finally:
            await sc.stop()


@pytest.mark.asyncio
async def test_an_edge_sidecar_counts_its_regions_demand_whoever_serves_it(
    kafka: KafkaSettings, codec: Codec
) -> None:
    """Outside the central region the sidecar counts every request on the region's demand
    series, whether the mirror or a central endpoint served it: the series the planner
    forecasts is not censored by the mirror."""
    with BackendProcess({"central-1": 0, "mirror-1": 0}) as b:
        settings = SidecarSettings(
            upstreams=[{"id": "central-1", "url": b.urls["central-1"], "api": "orders"}],
            listen_port=0, admin_port=0, region="eu", mirror_lookahead_s=5.0,
            telemetry_interval_s=0.5, mirror_hosts=["127.0.0.1"])
        sc = Sidecar(settings, kafka, codec=codec)
        await sc.start()
        served: dict[str, int] = {}
        try:
            p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
            produce_overload(p, kafka, codec)
            assert p.flush(10) == 0
            async with aiohttp.ClientSession() as cs:
                async def who() -> str:
                    async with cs.get(f"http://127.0.0.1:{sc.port}/x") as r:
                        assert r.status == 200
                        return await r.text()

                for _ in range(3):  # no mirror yet: central serves
                    name = await who()
                    served[name] = served.get(name, 0) + 1
                p.produce(topic_name(kafka, "mirror-status"), codec.encode(
                    "MirrorStatus", status("READY", b.urls["mirror-1"], capacity=1000.0)),
                    b"eu")
                assert p.flush(10) == 0
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:  # central until the mirror is known
                    name = await who()
                    served[name] = served.get(name, 0) + 1
                    if name == "mirror-1" and served[name] >= 5:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await sc.stop()  # publishes the open windows
        assert served.get("central-1") and served.get("mirror-1") == 5, served
        counts: dict[str, int] = {}
        for msg in read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry")):
            value = codec.decode(msg.value() or b"")
            for w in value.get("windows", [value]):
                if w["agent_id"].startswith(sc.id) or w["region"] == "eu":
                    counts[w["endpoint_id"]] = counts.get(w["endpoint_id"], 0) \
                        + w["request_count"]
        assert counts.get("orders-demand-eu") == sum(served.values()), counts
        assert counts.get("central-1") == served["central-1"], counts


def test_planner_restores_its_commands_and_dead_letters_bad_input(
    kafka: KafkaSettings, codec: Codec
) -> None:
    private, _ = generate_keypair()
    settings = MirrorSettings(signing_key=private, key_id="k1", activation_seconds=1,
                              margin_seconds=1, cooldown_seconds=60,
                              planner_app_id=f"p-{kafka.topic_prefix}",
                              bundles={"orders": {"digest": DIGEST}})
    first = Planner(kafka, settings, codec)
    assert first.logic.config.bundles["orders"] == BundleSpec(DIGEST)
    now = int(time.time() * 1000)
    first.handle_score(b"k", codec.encode("LoadScore", {
        **score(now, 150.0), "score": 0.5, "predicted_utilization": 1.5,
        "latency_p99_ms": 5.0, "error_rate": 0.0}))
    first.handle_score(b"k", b"not avro", 1, 7)
    first.handle_status(b"eu", codec.encode("LoadScore", {  # the wrong schema
        **score(now, 1.0), "score": 0.5, "predicted_utilization": 0.0,
        "latency_p99_ms": 5.0, "error_rate": 0.0}), 0, 3)
    (cmd,) = first.tick(now)
    assert cmd["action"] == "ACTIVATE"
    first.close()
    dl = read_topic(kafka.bootstrap_servers, topic_name(kafka, "dead-letter"), 10)
    heads = sorted(str(dict(m.headers() or [])["loadcast.reason"]) for m in dl)
    assert heads == ["b'bad_magic'", "b'wrong_schema'"]

    # A restarted planner continues: already active, no second ACTIVATE; next sequence up.
    second = Planner(kafka, settings, codec)
    st = second.logic.states[("orders", "eu")]
    assert st.active and st.sequence == cmd["sequence"]
    second.handle_score(b"k", codec.encode("LoadScore", {
        **score(now + 500, 150.0), "score": 0.5, "predicted_utilization": 1.5,
        "latency_p99_ms": 5.0, "error_rate": 0.0}))
    assert second.tick(now + 500) == []
    second.close()


def test_a_forged_mirror_status_never_adds_a_host_outside_mirror_hosts() -> None:
    router = Router([Upstream(id="c1", url="http://127.0.0.1:9001", api="orders")])
    route = router.routes["orders"]
    d = MirrorDirector(region="central", lookahead_s=5.0, mirror_hosts=["127.0.0.0/8"])
    now = int(time.time() * 1000)
    forged = ["http://203.0.113.7:80", "http://127.0.0.1.evil.example/", "file:///etc/passwd",
              "http://[::1]:9/", "http://127.0.0.1:99999/", "gopher://127.0.0.1/"]
    assert d.apply_statuses([status("READY", u) for u in forged], now) == 0
    assert d.refused_hosts == len(forged)
    d.apply_scores([score(now, 500.0)], now)  # demand far over central capacity
    assert d.choose(route, "eu", 0.0, 0) is None  # so it would take a mirror: there is none
    assert d.apply_statuses([status("READY", "http://127.0.0.1:9100")], now) == 1
    # no configured hosts (the default): no mirror at all
    assert MirrorDirector(region="central").apply_statuses(
        [status("READY", "http://127.0.0.1:9100")], now) == 0


def test_a_bad_mirror_hosts_entry_stops_start_up_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="mirror_hosts"):
        SidecarSettings(mirror_hosts=["10.0.0.0/33"])
