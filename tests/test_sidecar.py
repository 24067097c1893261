"""The routing sidecar with the built-in proxy, on the real embedded broker, real loopback
upstreams (separate processes) and real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from confluent_kafka import Producer

from schemas.codec import Codec
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.app import Sidecar
from streams.sidecar.config import SidecarSettings
from streams.sidecar.testing import BackendProcess, score_record
from tests.kafka_helpers import read_topic

TOKEN = "s3cret-token"


@pytest.fixture
def backends() -> Iterator[BackendProcess]:
    with BackendProcess({"a": 0, "b": 0, "c": 0}) as b:
        yield b


def sidecar_settings(urls: dict[str, str], **kw: Any) -> SidecarSettings:
    ups = [{"id": k, "url": u, "api": "orders"} for k, u in urls.items()]
    base: dict[str, Any] = {"upstreams": ups, "listen_port": 0, "admin_port": 0,
                            "admin_token": TOKEN, "region": "eu-west",
                            "telemetry_interval_s": 1.0}
    base.update(kw)
    return SidecarSettings(**base)


@asynccontextmanager
async def running(sc: Sidecar) -> AsyncIterator[Sidecar]:
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


def publish(kafka: KafkaSettings, codec: Codec, records: list[dict[str, Any]],
            raw: list[bytes] = ()) -> None:  # type: ignore[assignment]
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
    topic = topic_name(kafka, "load-scores")
    for v in raw:
        p.produce(topic, v, b"garbage")
    for r in records:
        p.produce(topic, codec.encode("LoadScore", r), r["endpoint_id"].encode())
    assert p.flush(10) == 0


async def drive(port: int, n: int, *, concurrency: int = 8, method: str = "GET",
                path: str = "/x", headers: dict[str, str] | None = None,
                ) -> tuple[Counter[str], Counter[int]]:
    """Send ``n`` requests with ``concurrency`` workers; count endpoints and statuses."""
    endpoints: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    left = [n]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as cs:
        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                async with cs.request(method, f"http://127.0.0.1:{port}{path}",
                                      headers=headers) as r:
                    await r.read()
                    statuses[r.status] += 1
                    if "X-Endpoint" in r.headers:
                        endpoints[r.headers["X-Endpoint"]] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return endpoints, statuses


async def admin(sc: Sidecar, method: str, path: str, token: str | None = None,
                json: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as cs, cs.request(
        method, f"http://127.0.0.1:{sc.admin_port}{path}", headers=headers, json=json
    ) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def wait_for(pred: Any, timeout: float, step: float = 0.01) -> float:
    """Seconds until ``pred()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def _text(v: str | bytes | None) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def normalized(w: dict[str, float]) -> dict[str, float]:
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


# serial: the shares are peak-EWMA's as well as the weights' (predictive is P2C on cost per
# unit of weight), and a host stall of a few hundred ms, common beside another test file on
# two cores, lands on the endpoints that had requests in flight and is held ~DECAY_S: the
# lightly weighted endpoint then rightly takes a large share (seen: 0.45 for weight 0.1).
@pytest.mark.serial
@pytest.mark.asyncio
async def test_scores_shift_traffic_shares_within_two_intervals(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    step = 2  # score interval, seconds
    sc = Sidecar(sidecar_settings(backends.urls), kafka, codec=codec, sidecar_id="sc-shares")
    async with running(sc):
        for scores in ({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.1, "b": 0.3, "c": 0.6}):
            t0 = time.monotonic()
            # capacity far above a loopback burst: this test is about shares, not shedding
            publish(kafka, codec, [score_record(e, s, api="orders", step_seconds=step,
                                                valid_for_s=2 * step, capacity_rps=1e6)
                                   for e, s in scores.items()])
            want = normalized(scores)
            await wait_for(lambda w=want: normalized(sc.table.weights("orders"))
                           == pytest.approx(w, abs=1e-3), timeout=step)
            got, statuses = await drive(sc.port, 1500)
            elapsed = time.monotonic() - t0
            assert statuses == {200: 1500}
            share = {k: v / 1500 for k, v in got.items()}
            # each endpoint's peak-EWMA latency (ms): one far above the others says a stall
            peaks = {e.id: round(e.rtt_ms, 1) for e in sc.router.routes["orders"].endpoints}
            # predictive is P2C on peak-EWMA cost per unit of weight: shares follow the
            # weights' order, steeper than proportional (a light endpoint loses most of
            # its draws), so the check is the order and where the bulk goes.
            top, low = max(want, key=want.__getitem__), min(want, key=want.__getitem__)
            by_share = sorted(scores, key=lambda e: share.get(e, 0.0))
            assert by_share == sorted(scores, key=want.__getitem__), (share, want, peaks)
            assert share[top] >= want[top] - 0.1 and share.get(low, 0.0) <= want[low] + 0.05, \
                (share, want, peaks)
            assert elapsed <= 2 * step, f"shares matched only after {elapsed:.2f}s"
        status, view = await admin(sc, "GET", "/weights")
        assert status == 200 and view["orders"]["score_order"] == ["c", "b", "a"]
        assert not view["orders"]["stale"] and view["orders"]["policy"] == "predictive"
    # every weight change is on routing-decisions with old and new weights and scores
    msgs = read_topic(kafka.bootstrap_servers, topic_name(kafka, "routing-decisions"),
                      min_records=2)
    decisions = [codec.decode(m.value() or b"") for m in msgs]
    changes = [d for d in decisions if d["kind"] == "WEIGHTS"]
    assert changes[-1]["weights"] == pytest.approx({"a": 1 / 6, "b": 0.5, "c": 1.0})
    assert changes[-1]["previous_weights"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 1 / 6})
    assert changes[-1]["scores"] == {"a": 0.1, "b": 0.3, "c": 0.6}
    assert not changes[-1]["stale"] and changes[-1]["sidecar_id"] == "sc-shares"
    sampled = [d for d in decisions if d["kind"] == "REQUEST"]
    assert sampled and all(d["endpoint_id"] in "abc" and d["status"] == 200 for d in sampled)
    # the sidecar is a telemetry source: its agent published windows of what it routed
    tele = read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry"), min_records=1)
    assert tele, "no telemetry from the sidecar's agent"


@pytest.mark.asyncio
async def test_garbage_on_score_topic_is_counted_and_skipped(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    sc = Sidecar(sidecar_settings(backends.urls), kafka, codec=codec, sidecar_id="sc-garbage")
    async with running(sc):
        publish(kafka, codec, [score_record("a", 0.9, api="orders"),
                               score_record("b", 0.0, api="orders"),
                               score_record("c", 0.0, api="orders")],
                raw=[b"not avro at all", b"\x00\x00\x00\x00\x07junk", b""])
        await wait_for(lambda: sc.table.weights("orders")["b"] == 0.0, timeout=5)
        assert sc.subscriber is not None
        sub = sc.subscriber
        await wait_for(lambda: sub.skipped == 3, timeout=5)
        got, _ = await drive(sc.port, 200)
        assert got == {"a": 200}
        _, text = await admin(sc, "GET", "/metrics")
        assert 'loadcast_sidecar_scores_skipped_total{reason="bad_magic",sidecar="sc-garbage"}' \
            in text
    dlq = read_topic(kafka.bootstrap_servers, topic_name(kafka, "dead-letter"), min_records=3)
    reasons = sorted(_text(dict(m.headers() or [])["loadcast.reason"]) for m in dlq)
    assert len(reasons) == 3 and "bad_magic" in reasons


@pytest.mark.asyncio
async def test_stale_scores_fall_back_to_peak_ewma(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    sc = Sidecar(sidecar_settings(backends.urls), kafka, codec=codec, sidecar_id="sc-stale")
    async with running(sc):
        valid_s = 1.5
        publish(kafka, codec, [score_record(e, s, api="orders", valid_for_s=valid_s)
                               for e, s in {"a": 1.0, "b": 0.0, "c": 0.0}.items()])
        await wait_for(lambda: not sc.router.routes["orders"].stale, timeout=5)
        valid_until = sc.table._apis["orders"].scores["a"].valid_until_ms / 1000
        got, _ = await drive(sc.port, 100)
        assert got == {"a": 100}
        # no more scores: the sidecar must notice by itself, right after valid_until
        await wait_for(lambda: sc.router.routes["orders"].stale, timeout=valid_s + 1)
        late = time.time() - valid_until
        assert late < 0.5, f"switched {late:.2f}s after valid_until"
        _, text = await admin(sc, "GET", "/metrics")
        assert 'loadcast_sidecar_scores_stale{api="orders",sidecar="sc-stale"} 1.0' in text
        assert ('loadcast_sidecar_policy_active{api="orders",policy="peak-ewma",'
                'sidecar="sc-stale"} 1.0') in text
        assert ('loadcast_sidecar_policy_active{api="orders",policy="predictive",'
                'sidecar="sc-stale"} 0.0') in text
        # still routing, now to every endpoint (peak-EWMA), never "no routing"
        got, statuses = await drive(sc.port, 300)
        assert statuses == {200: 300} and set(got) == {"a", "b", "c"}
        _, health = await admin(sc, "GET", "/health")
        assert health["apis"]["orders"] == {"stale": True, "policy": "peak-ewma",
                                            "available": 3, "endpoints": 3}


@pytest.mark.asyncio
async def test_dynamic_routing_off_uses_first_available(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    sc = Sidecar(sidecar_settings(backends.urls), kafka, codec=codec, sidecar_id="sc-off")
    async with running(sc):
        publish(kafka, codec, [score_record(e, s, api="orders")
                               for e, s in {"a": 0.05, "b": 0.9, "c": 0.9}.items()])
        await wait_for(lambda: not sc.router.routes["orders"].stale, timeout=5)
        on, _ = await drive(sc.port, 300)
        assert on["a"] < 40  # scores steer away from a
        off, statuses = await drive(sc.port, 300,
                                    headers={"X-Loadcast-Dynamic-Routing": "off"})
        assert off == {"a": 300} and statuses == {200: 300}
        # ... and for the whole sidecar, switched through the admin API with the token
        status, _ = await admin(sc, "PUT", "/dynamic-routing", TOKEN, {"enabled": False})
        assert status == 200
        off, _ = await drive(sc.port, 100)
        assert off == {"a": 100}
        # first *available*: with a ejected, b (next in configuration order) takes it all
        status, _ = await admin(sc, "POST", "/endpoints/a/eject", TOKEN)
        assert status == 200
        off, _ = await drive(sc.port, 100)
        assert off == {"b": 100}
        _, bad = await drive(sc.port, 3, headers={"X-Loadcast-Dynamic-Routing": "maybe"})
        assert bad == {400: 3}


@pytest.mark.asyncio
async def test_killed_upstream_idempotent_requests_never_fail(
    kafka: KafkaSettings, codec: Codec
) -> None:
    with BackendProcess({"a": 0}) as a, BackendProcess({"b": 0, "c": 0}) as bc:
        urls = {**a.urls, **bc.urls}
        sc = Sidecar(sidecar_settings(urls, eject_after_failures=3), kafka, codec=codec,
                     sidecar_id="sc-kill")
        async with running(sc):
            sc.set_manual_scores("orders", {"a": 0.8, "b": 0.5, "c": 0.5}, 60)

            async def kill_soon() -> None:
                await asyncio.sleep(0.4)
                a.kill()

            load = asyncio.create_task(drive(sc.port, 3000, concurrency=16))
            await kill_soon()
            got, statuses = await load
            assert statuses == {200: 3000}, statuses  # none failed
            assert got["a"] > 0 and got["b"] + got["c"] > 1000
            ep_a = sc.router.endpoints["a"]
            assert ep_a.failures >= 1 and not ep_a.available(time.monotonic())  # ejected
            _, text = await admin(sc, "GET", "/metrics")
            assert 'loadcast_sidecar_ejections_total{endpoint="a",sidecar="sc-kill"}' in text


@pytest.mark.asyncio
async def test_non_idempotent_request_already_sent_gets_502(
    kafka: KafkaSettings, codec: Codec
) -> None:
    with BackendProcess({"a": 0}) as a, BackendProcess({"b": 0}) as b:
        sc = Sidecar(sidecar_settings({**a.urls, **b.urls}), None, sidecar_id="sc-502")
        async with running(sc):
            sc.set_manual_scores("orders", {"a": 1.0, "b": 0.0}, 60)
            async with aiohttp.ClientSession() as cs:
                post = asyncio.create_task(cs.post(
                    f"http://127.0.0.1:{sc.port}/slow?ms=3000", data=b"order #1"))
                await wait_for(lambda: sc.router.endpoints["a"].in_flight == 1, timeout=5)
                a.kill()  # the POST is with a: it may have taken effect
                r = await post
                body = await r.json()
                assert r.status == 502
                assert body["error"] == "sent_then_failed"
                assert "POST" in body["message"] and "not retried" in body["message"]
                # a refused connection (nothing sent) is not a reason to fail a POST
                async with cs.post(f"http://127.0.0.1:{sc.port}/echo", data=b"order #2") as r2:
                    assert r2.status == 200 and await r2.read() == b"order #2"
                    assert r2.headers["X-Endpoint"] == "b"


@pytest.mark.asyncio
async def test_no_endpoint_503_with_retry_after_and_admin_needs_token(
    backends: BackendProcess,
) -> None:
    sc = Sidecar(sidecar_settings(backends.urls), None, sidecar_id="sc-admin")
    async with running(sc):
        for path, body in [("/endpoints/a/eject", None), ("/weights", {"api": "orders"}),
                           ("/policy", {"policy": "round-robin"})]:
            method = "POST" if path.startswith("/endpoints") else "PUT"
            assert (await admin(sc, method, path, None, body))[0] == 401
            assert (await admin(sc, method, path, "wrong", body))[0] == 401
        status, err = await admin(sc, "PUT", "/weights", TOKEN,
                                  {"api": "orders", "scores": {"a": 2}})
        assert status == 400 and "scores.a" in err["error"]
        for e in "abc":
            assert (await admin(sc, "POST", f"/endpoints/{e}/eject", TOKEN))[0] == 200
        async with aiohttp.ClientSession() as cs, cs.get(
            f"http://127.0.0.1:{sc.port}/x"
        ) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
            assert (await r.json())["error"] == "no_endpoint"
        assert (await admin(sc, "POST", "/endpoints/b/readmit", TOKEN))[0] == 200
        got, _ = await drive(sc.port, 20)
        assert got == {"b": 20}
        _, bad = await drive(sc.port, 2, headers={"X-Loadcast-Api": "nope"})
        assert bad == {400: 2}


@pytest.mark.asyncio
async def test_compression_passes_through_and_can_be_added(backends: BackendProcess) -> None:
    sc = Sidecar(sidecar_settings(backends.urls, compress_responses=True), None)
    async with running(sc), aiohttp.ClientSession(auto_decompress=False) as cs:
        async with cs.get(f"http://127.0.0.1:{sc.port}/gzip") as r:
            raw = await r.read()
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(raw).startswith(r.headers["X-Endpoint"].encode())
        async with cs.get(f"http://127.0.0.1:{sc.port}/big?kb=300",
                          headers={"Accept-Encoding": "gzip"}) as r:
            raw = await r.read()
            assert r.headers["Content-Encoding"] == "gzip" and len(raw) < 50_000
            assert gzip.decompress(raw) == b"x" * 300 * 1024
        async with cs.get(f"http://127.0.0.1:{sc.port}/big?kb=300",
                          skip_auto_headers=["Accept-Encoding"]) as r:  # no gzip asked
            assert "Content-Encoding" not in r.headers and len(await r.read()) == 300 * 1024


async def paced(port: int, rps: float, seconds: float, *,
                headers: dict[str, str] | None = None) -> list[tuple[float, int]]:
    """Offer ``rps`` requests/s (open loop) for ``seconds``; (send time, status) of each,
    send times in seconds from the start. Bounded: rps x seconds requests, 10 s each."""
    out: list[tuple[float, int]] = []
    n = round(rps * seconds)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as cs:
        async def one(at: float) -> None:
            async with cs.get(f"http://127.0.0.1:{port}/x", headers=headers) as r:
                await r.read()
                out.append((at, r.status))

        t0 = time.monotonic()
        tasks = []
        for i in range(n):
            delay = t0 + i / rps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(time.monotonic() - t0)))
        await asyncio.gather(*tasks)
    return sorted(out)


def default_scores(at_ms: int) -> list[dict[str, Any]]:
    """What the processor publishes for a new user's endpoints: no capacity configured
    or learned (DEFAULT 100 rps), and a load far above it."""
    return [{**score_record(e, 0.05, api="orders", at_ms=at_ms, valid_for_s=60,
                            predicted_utilization=6.0, capacity_rps=100.0),
             "capacity_source": "DEFAULT", "current_rps": 600.0} for e in "abc"]


@pytest.mark.asyncio
async def test_no_known_capacity_sheds_nothing_under_a_burst(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    sc = Sidecar(sidecar_settings(backends.urls), kafka, codec=codec, sidecar_id="sc-nocap")
    async with running(sc):
        publish(kafka, codec, default_scores(int(time.time() * 1000)))
        await wait_for(lambda: not sc.router.routes["orders"].stale, timeout=10)
        t0 = time.monotonic()
        _, statuses = await drive(sc.port, 3000, concurrency=16)
        rate = 3000 / (time.monotonic() - t0)
        assert rate > 300, f"the burst was only {rate:.0f} req/s"  # far above 100 x 3
        assert statuses == {200: 3000}, statuses
        status, view = await admin(sc, "GET", "/weights")
        v = view["orders"]
        assert status == 200 and v["capacity_source"] == "none", v
        assert v["capacity_total_rps"] is None and v["shed"] == 0
        assert v["capacities"]["a"] == {"rps": None, "source": "none", "confidence": 0.0,
                                        "used": False}
        assert v["weights"] == {"a": 1.0, "b": 1.0, "c": 1.0}  # no guess skews them
        assert v["offered_rps"] > 0


@pytest.mark.asyncio
async def test_configured_capacity_sheds_from_offered_rate_and_stops(
    backends: BackendProcess,
) -> None:
    interval = 1.0  # score interval (telemetry_interval_s), seconds
    ups = [{"id": k, "url": u, "api": "orders", "capacity_rps": 20.0}
           for k, u in backends.urls.items()]  # 60 req/s in all
    sc = Sidecar(sidecar_settings(backends.urls, upstreams=ups,
                                  telemetry_interval_s=interval), None, sidecar_id="sc-cap")
    async with running(sc):
        below = await paced(sc.port, 30, 1.5)
        assert Counter(st for _, st in below) == {200: 45}
        over = await paced(sc.port, 200, 2.0)  # 3.3x capacity
        shed = [t for t, st in over if st == 503]
        assert len(shed) > 100, Counter(st for _, st in over)
        assert shed[0] < 1.0, f"shedding started only {shed[0]:.2f}s into the overload"
        # what got through is about the capacity, not less (shed requests count as offered)
        served = sum(1 for _, st in over if st == 200)
        assert 60 <= served <= 250, served
        after = await paced(sc.port, 20, 4.0)
        late = [t for t, st in after if st != 200]
        assert not late or late[-1] <= 2 * interval, (
            f"still shedding {late[-1]:.2f}s after the offered rate fell")
        assert all(st == 200 for t, st in after if t > 2 * interval)
        _, view = await admin(sc, "GET", "/weights")
        v = view["orders"]
        assert v["capacity_source"] == "configured" and v["capacity_total_rps"] == 60.0
        assert v["shed"] == len(shed) + len(late)


@pytest.mark.asyncio
async def test_overload_sheds_lowest_priority_first(backends: BackendProcess) -> None:
    ups = [{"id": k, "url": u, "api": "orders", "capacity_rps": 20.0}
           for k, u in backends.urls.items()]  # 60 req/s in all
    sc = Sidecar(sidecar_settings(backends.urls, upstreams=ups), None, sidecar_id="sc-shed")
    async with running(sc):
        # 100 req/s offered, half of each priority: 40 % must go, all of it priority 0
        low, high = await asyncio.gather(
            paced(sc.port, 50, 4.0, headers={"X-Loadcast-Priority": "0"}),
            paced(sc.port, 50, 4.0, headers={"X-Loadcast-Priority": "9"}),
        )
        low_shed = sum(1 for t, st in low if st == 503 and t > 1.0)
        assert low_shed >= 0.3 * sum(1 for t, _ in low if t > 1.0), Counter(s for _, s in low)
        assert Counter(st for _, st in high) == {200: 200}


@pytest.mark.parametrize(
    ("env", "args", "field"),
    [
        ({"LOADCAST_SIDECAR__UPSTREAMS": '[{"id": "a", "url": "ftp://127.0.0.1:1"}]'}, [],
         "sidecar.upstreams.0.url"),
        ({"LOADCAST_SIDECAR__UPSTREAMS": '[{"id": "a", "url": "http://127.0.0.1:1", '
          '"capacity_rps": "lots"}]'}, [], "sidecar.upstreams.0.capacity_rps"),
        ({}, ["--policy", "fastest"], "sidecar.policy"),
        ({}, [], "sidecar.upstreams: no upstream endpoints configured"),
    ],
)
def test_malformed_config_stops_start_up_naming_the_field(
    env: dict[str, str], args: list[str], field: str, tmp_path: Any
) -> None:
    from typer.testing import CliRunner

    from loadcast.cli import app

    if field == "sidecar.policy":
        ups = tmp_path / "ups.json"
        ups.write_text('[{"id": "a", "url": "http://127.0.0.1:1"}]')
        args = [*args, "--upstreams", str(ups)]
    r = CliRunner().invoke(app, ["sidecar", "--no-kafka", *args], env=env)
    assert r.exit_code == 2, r.output
    assert field in " ".join(r.output.split()), r.output


def test_bad_upstreams_file_via_cli_names_entry_and_field(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    from loadcast.cli import app

    ups = tmp_path / "ups.toml"
    ups.write_text('[[upstreams]]\nid = "a"\nurl = "http://127.0.0.1:9001"\n'
                   '[[upstreams]]\nid = "b"\nurl = "http://127.0.0.1"\n')
    r = CliRunner().invoke(app, ["sidecar", "--no-kafka", "--upstreams", str(ups)])
    assert r.exit_code == 2
    assert "ups.toml: upstreams.1.url" in " ".join(r.output.split())
