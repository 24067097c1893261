"""HAProxy as the data plane: a real haproxy process, weights pushed by the sidecar through
the runtime API from scores on the real embedded broker; shares read from HAProxy's own
statistics. Skipped only where the haproxy binary is missing (``make test`` installs it)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from schemas.codec import Codec
from streams.kafka.broker import free_port
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.app import Sidecar
from streams.sidecar.config import Upstream, UpstreamConfigError
from streams.sidecar.haproxy import (
    HAProxyProcess,
    RuntimeAPI,
    haproxy_binary,
    render_config,
    server_counts,
)
from streams.sidecar.haproxy_plane import HAProxyPlane
from streams.sidecar.testing import BackendProcess, score_record
from tests.kafka_helpers import read_topic
from tests.test_sidecar import drive, normalized, publish, running, sidecar_settings, wait_for

pytestmark = [
    pytest.mark.skipif(haproxy_binary() is None,
                       reason="haproxy binary not installed (make system-deps installs it)"),
]


@pytest.fixture
def backends() -> Iterator[BackendProcess]:
    with BackendProcess({"a": 0, "b": 0, "c": 0}) as b:
        yield b


def test_config_is_accepted_by_haproxy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ups = [Upstream(id="a", url="http://127.0.0.1:9001", api="orders"),
           Upstream(id="b", url="http://127.0.0.1:9002", api="orders"),
           Upstream(id="x", url="http://127.0.0.1:9003", api="search")]
    cfg = render_config(ups, bind=f"127.0.0.1:{free_port()}",
                        socket_path=tmp_path / "s.sock")
    assert "backend be_orders\n    balance roundrobin" in cfg
    assert "backend be_search_first\n    balance first" in cfg
    assert cfg.count("weight 100") == 6  # never 1: relative weights would round to 0
    proc = HAProxyProcess(cfg, workdir=tmp_path)
    proc.check()  # haproxy -c


@pytest.mark.asyncio
async def test_scores_drive_haproxy_weights_and_shares(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    step = 2
    # weighted round robin: shares follow the weights at this light load (the default,
    # leastconn, spreads idle servers evenly: tests/test_haproxy.py::test_balance_*)
    sc = Sidecar(sidecar_settings(backends.urls, data_plane="haproxy",
                                  haproxy_balance="roundrobin"), kafka, codec=codec,
                 sidecar_id="sc-haproxy")
    async with running(sc):
        plane = sc.plane
        assert isinstance(plane, HAProxyPlane)
        assert plane.runtime is not None and plane.process is not None
        runtime = plane.runtime
        for scores in ({"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.1, "b": 0.3, "c": 0.6}):
            t0 = time.monotonic()
            publish(kafka, codec, [score_record(e, s, api="orders", step_seconds=step,
                                                valid_for_s=2 * step) for e, s in scores.items()])
            want = normalized(scores)

            def live(w: dict[str, float] = want) -> bool:
                got = {e: int(runtime.command_sync(f"get weight be_orders/{e}").split()[0])
                       for e in "abc"}
                return normalized({k: float(v) for k, v in got.items()}) == pytest.approx(
                    w, abs=0.01)

            await wait_for(live, timeout=step, step=0.02)
            before = server_counts(runtime.stats_sync(), "orders")
            got, statuses = await drive(sc.port, 1500)
            after = server_counts(runtime.stats_sync(), "orders")
            elapsed = time.monotonic() - t0
            assert statuses == {200: 1500}
            served = {e: after[e] - before[e] for e in "abc"}
            assert sum(served.values()) == 1500
            assert served == dict(got)  # HAProxy's counters agree with what clients saw
            for e in "abc":
                assert served[e] / 1500 == pytest.approx(want[e], abs=0.05), (served, want)
            assert elapsed <= 2 * step, f"shares matched only after {elapsed:.2f}s"
        # dynamic routing off per request: HAProxy's "balance first" twin backend
        off, _ = await drive(sc.port, 200, headers={"X-Loadcast-Dynamic-Routing": "off"})
        assert off == {"a": 200}
        await asyncio.sleep(1.2)  # one more stats poll for the edge agent
    # the sidecar is a telemetry source with HAProxy too (from HAProxy's counters)
    tele = read_topic(kafka.bootstrap_servers, topic_name(kafka, "telemetry"), min_records=1)
    counted: Counter[str] = Counter()
    for m in tele:
        w = codec.decode(m.value() or b"")
        counted[w["endpoint_id"]] += w["request_count"]
    assert set(counted) == {"a", "b", "c"} and sum(counted.values()) >= 1000, counted


@pytest.mark.asyncio
@pytest.mark.parametrize(("balance", "slow_share"), [("auto", (0.0, 0.15)),
                                                     ("roundrobin", (0.28, 0.39))])
async def test_balance_leastconn_sends_less_to_a_slow_backend(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess, balance: str,
    slow_share: tuple[float, float],
) -> None:
    """``predictive`` on HAProxy balances ``leastconn`` (weighted by the scores): a backend
    that answers slowly holds its connections and gets few new requests before any score
    says so. ``roundrobin`` gives it its share whatever its latency."""
    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        return web.Response(body=b"s", headers={"X-Endpoint": "s"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        urls = {"a": backends.urls["a"], "b": backends.urls["b"], "s": f"http://127.0.0.1:{port}"}
        settings = sidecar_settings(urls, data_plane="haproxy", haproxy_balance=balance)
        sc = Sidecar(settings, kafka, codec=codec, sidecar_id=f"sc-balance-{balance}")
        async with running(sc):
            assert isinstance(sc.plane, HAProxyPlane) and sc.plane.process is not None
            want = "leastconn" if balance == "auto" else balance
            assert f"backend be_orders\n    balance {want}" in \
                sc.plane.process.config_path.read_text()
            got, statuses = await drive(sc.port, 450, concurrency=16)
        assert statuses == {200: 450}
        lo, hi = slow_share
        assert lo <= got["s"] / 450 <= hi, got
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_stale_scores_on_haproxy_fall_back_to_stats_weights(
    kafka: KafkaSettings, codec: Codec, backends: BackendProcess
) -> None:
    sc = Sidecar(sidecar_settings(backends.urls, data_plane="haproxy"), kafka, codec=codec,
                 sidecar_id="sc-haproxy-stale")
    async with running(sc):
        assert isinstance(sc.plane, HAProxyPlane)
        runtime = sc.plane.runtime
        assert runtime is not None
        publish(kafka, codec, [score_record(e, s, api="orders", valid_for_s=1.0)
                               for e, s in {"a": 1.0, "b": 0.0, "c": 0.0}.items()])
        await wait_for(lambda: runtime.command_sync("get weight be_orders/b").startswith("0 "),
                       timeout=5)
        got, _ = await drive(sc.port, 100)
        assert got == {"a": 100}
        await wait_for(lambda: sc.router.routes["orders"].stale, timeout=3)
        await wait_for(lambda: not runtime.command_sync("get weight be_orders/b")
                       .startswith("0 "), timeout=3)
        got, statuses = await drive(sc.port, 300)
        assert statuses == {200: 300} and set(got) == {"a", "b", "c"}  # never "no routing"


@pytest.mark.asyncio
async def test_attach_to_running_haproxy(backends: BackendProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = sidecar_settings(backends.urls)
    port = free_port()
    sock = tmp_path / "admin.sock"
    proc = HAProxyProcess(render_config(settings.resolved_upstreams(), bind=f"127.0.0.1:{port}",
                                        socket_path=sock), workdir=tmp_path)
    proc.start(sock)
    try:
        bad = sidecar_settings({"zz": "http://127.0.0.1:1"}, data_plane="haproxy",
                               haproxy_socket=sock)
        with pytest.raises(UpstreamConfigError, match="haproxy_socket: HAProxy has no server"):
            await Sidecar(bad, None).start()
        sc = Sidecar(sidecar_settings(backends.urls, data_plane="haproxy", haproxy_socket=sock,
                                      listen_port=port), None)
        async with running(sc):
            sc.set_manual_scores("orders", {"a": 0.0, "b": 0.0, "c": 1.0}, 30)
            api = RuntimeAPI(sock)
            await wait_for(lambda: api.command_sync("get weight be_orders/a").startswith("0 "),
                           timeout=3)
            got, _ = await drive(port, 100)
            assert got == {"c": 100}
        assert proc.alive()  # attached, not owned: the sidecar leaves it running
    finally:
        proc.stop()


@pytest.fixture
def single_threaded(tmp_path) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """Three upstreams as a new user starts them: ``python -m http.server`` (one connection
    at a time, accept queue of 5); 50 connections saturate them and overflow the queues."""
    import socket
    import subprocess
    import sys

    (tmp_path / "x").write_text("x\n")
    ports = {e: free_port() for e in "abc"}
    procs = [subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               str(p), "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p in ports.values()]
    try:
        deadline = time.monotonic() + 20
        for p in ports.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "http.server did not start"
                    time.sleep(0.05)
        yield {e: f"http://127.0.0.1:{p}" for e, p in ports.items()}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


@pytest.mark.asyncio
async def test_saturated_backends_behind_sidecar_haproxy_answer_not_503(
    single_threaded: dict[str, str],
) -> None:
    # Saturated, not dead: an accept queue that overflows drops SYNs, retransmitted after
    # 1 s. A connect timeout below that made every such connect an L4 error and
    # "observe layer4 ... on-error mark-down" took the servers down: mostly 503s.
    sc = Sidecar(sidecar_settings(single_threaded, data_plane="haproxy"), None,
                 sidecar_id="hap-saturated")
    async with running(sc):
        _, statuses = await drive(sc.port, 2500, concurrency=50)
        assert statuses == {200: 2500}, statuses
        assert isinstance(sc.plane, HAProxyPlane) and sc.plane.runtime is not None
        rows = [r for r in await sc.plane.runtime.stats() if r.get("pxname") == "be_orders"
                and r.get("svname") in ("a", "b", "c")]
        assert all(r["status"].startswith("UP") for r in rows), [
            (r["svname"], r["status"]) for r in rows]
