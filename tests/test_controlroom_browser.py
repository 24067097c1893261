"""The control room in real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium), on ``loadcast api`` fed from the embedded
broker with LoadScore records shaped as the worker publishes them (forecast points per
horizon with their band): the overview lists the endpoints in the order they run out
with the numbers the API holds, a chart takes a new score within 5 s, a stale-score
banner appears when scores stop, a mirror appears when the planner commands one, the page
survives the API restarting, and the browser logs no error. Screenshots go to ``out/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from confluent_kafka import Producer

from benchmarks.support.processes import kafka_env, stop_process
from benchmarks.support.records import window
from schemas.codec import Codec
from streams.api.config import ApiSettings
from streams.api.service import ApiService
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.conftest import REPO

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ZONE = "America/New_York"  # the viewer's zone, not the server's (UTC)
OUT = REPO / "out"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                       reason="Debian's chromium and chromium-driver are not installed "
                              "(make system-deps installs them)"),
]


def worker_score(endpoint: str, at_ms: int, current: float, growth: float, *,
                 capacity: float = 100.0, api: str = "orders", region: str = "eu",
                 valid_for_s: float = 60.0) -> dict[str, Any]:
    """A LoadScore as the worker publishes it: 5 one-second horizons with a 90 % band."""
    means = [current + growth * h for h in range(1, 6)]
    return {
        "endpoint_id": endpoint, "api": api, "region": region, "computed_at": at_ms,
        "valid_until": at_ms + int(valid_for_s * 1000),
        "score": round(max(0.0, 1 - max(means) / capacity), 3), "capacity_rps": capacity,
        "capacity_source": "LEARNED", "current_rps": current,
        "predicted_utilization": max(means) / capacity, "latency_p99_ms": 18.5,
        "error_rate": 0.004, "anomaly_score": 0.1, "step_seconds": 1,
        "forecast": [{"horizon": h, "at": at_ms + 1000 * h, "mean": m, "lower": m * 0.92,
                      "upper": m * 1.08} for h, m in enumerate(means, 1)],
        "model": "snarimax", "reasons": [f"forecast {max(means):.0f} req/s"],
    }


def fmt_num(v: float) -> str:
    """The page's number format (controlroom.js ``num``)."""
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_in_thread(port: int, kafka: KafkaSettings, codec: Codec) -> Iterator[ApiService]:
    """``ApiService`` on its own event loop in a thread; stopped (server, feed) on exit."""
    # keda_port=0: a free gRPC port, not HTTP port + 1 (another test may hold that one)
    svc = ApiService(ApiSettings(port=port, keda_port=0), kafka, codec=codec,
                     client_id=f"api-ui-{uuid.uuid4().hex[:6]}")
    stop = threading.Event()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(svc.run_until(stop))
        except BaseException as e:  # reported to the test below
            failed.append(e)

    thread = threading.Thread(target=run, name="api-ui", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while svc.port == 0 or svc.keda_port == 0:  # both servers up, or the error
        assert not failed, failed
        assert time.monotonic() < deadline, "the API did not start in 20 s"
        time.sleep(0.05)
    try:
        yield svc
    finally:
        stop.set()
        thread.join(20)
        assert not thread.is_alive(), "the API did not stop in 20 s"


@contextmanager
def chromium(width: int, height: int) -> Iterator[Any]:
    """Headless Chromium through /usr/bin/chromedriver (never Selenium Manager)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--no-first-run",
                "--disable-background-networking", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(CHROMEDRIVER, env={**os.environ, "TZ": ZONE})
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # an element re-rendered under us: look again
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def severe(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in log if e.get("level") == "SEVERE"]


def text(browser: Any, selector: str) -> str | None:
    """The visible text of the first element matching ``selector`` (None if none), read
    in one script: the page re-renders its tables every second."""
    return browser.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
        selector)


def chart_last_t(browser: Any, endpoint: str) -> int:
    """The time (epoch ms) of the newest actual point the page's chart of ``endpoint``
    holds (0 without one)."""
    return int(browser.execute_script(
        "const c = document.querySelector(`div.chart[data-endpoint=\"${arguments[0]}\"]`);"
        "return c && c.dataset.lastT ? Number(c.dataset.lastT) : 0;", endpoint))


def overview_rows(browser: Any) -> list[tuple[str, dict[str, str]]]:
    """The overview as shown: (endpoint, {data-field: visible text}) per row, in order."""
    rows = browser.execute_script("""
        return [...document.querySelectorAll('#overview tbody tr')].map(tr =>
          [tr.dataset.endpoint, Object.fromEntries([...tr.querySelectorAll('td[data-field]')]
            .map(td => [td.dataset.field, td.innerText]))]);""")
    return [(e, f) for e, f in rows]


def test_control_room_in_chromium(kafka: KafkaSettings, codec: Codec) -> None:

    OUT.mkdir(exist_ok=True)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})

    def produce(topic: str, name: str, rec: dict[str, Any], key: str) -> None:
        producer.produce(topic_name(kafka, topic), codec.encode(name, rec), key.encode())
        assert producer.flush(10) == 0

    now = int(time.time() * 1000)
    # three endpoints, 15 s of history each: one over capacity now, one crossing it
    # 3 steps ahead, one with room
    shapes = {"orders-eu-1": (70.0, 10.0), "orders-eu-2": (120.0, 1.0),
              "search-eu-1": (20.0, 1.0)}
    for i in range(15, 0, -1):
        for endpoint, (current, growth) in shapes.items():
            api = endpoint.split("-")[0]
            produce("load-scores", "LoadScore",
                    worker_score(endpoint, now - 1000 * i, current, growth, api=api), endpoint)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with chromium(1280, 800) as browser:
        with api_in_thread(port, kafka, codec) as svc:
            chart_s = _live_page(browser, svc, url, produce)
        _restart(browser, port, kafka, codec)
    print(f"chart took the new score in {chart_s:.2f} s")


def _live_page(browser: Any, svc: ApiService, url: str,
               produce: Callable[[str, str, dict[str, Any], str], None]) -> float:
    """The page on a running API: overview, chart update, mirror, stale banner, phone
    width; returns how long the chart took to show a new score (s)."""
    from selenium.webdriver.common.by import By

    def api_view() -> dict[str, Any]:
        with urllib.request.urlopen(f"{url}/ui/state.json", timeout=5) as r:
            return dict(json.load(r))

    wait(lambda: len(svc.state.scores) == 3, 15, "the API reading the scores")
    browser.get(f"{url}/ui")
    rows = wait(lambda: len(r := overview_rows(browser)) == 3 and r, 10,
                "three overview rows")
    view = api_view()
    order = [r["endpoint_id"] for r in view["overview"]]
    assert order == ["orders-eu-2", "orders-eu-1", "search-eu-1"]  # soonest out first
    assert [e for e, _ in rows] == order
    for r, (_, cells) in zip(view["overview"], rows, strict=True):
        assert cells["current_rps"] == f"{fmt_num(r['current_rps'])} req/s"
        f = r["forecast"]
        assert f["horizon"] == 5 and cells["forecast"].startswith(
            f"{fmt_num(f['mean'])} req/s\n90 %: {fmt_num(f['lower'])}–{fmt_num(f['upper'])}")
        assert cells["capacity_rps"] == "100 req/s\nlearned"
        assert cells["score"] == f"{r['score']:.2f}"
    assert rows[0][1]["exhaustion"].startswith("now") and "over capacity" in rows[0][1]["flags"]
    assert rows[2][1]["exhaustion"].startswith("not within forecast")
    assert text(browser, "#zone") == ZONE
    assert text(browser, "#banners > div") is None
    assert len(browser.find_elements(By.CSS_SELECTOR, "#charts .chart canvas")) == 3

    # a new score reaches the chart within 5 s; it is valid for 3 s only
    chart = 'div.chart[data-endpoint="orders-eu-1"]'
    fresh = int(time.time() * 1000)
    sent = time.monotonic()
    produce("load-scores", "LoadScore",
            worker_score("orders-eu-1", fresh, 75.0, 10.0, valid_for_s=3), "orders-eu-1")
    wait(lambda: browser.find_element(By.CSS_SELECTOR, chart)
         .get_attribute("data-last-t") == str(fresh), 5, "the chart taking the new score")
    chart_s = time.monotonic() - sent
    points = int(browser.find_element(By.CSS_SELECTOR, chart).get_attribute("data-points"))
    assert points == 16
    browser.save_screenshot(str(OUT / "controlroom-1280x800.png"))

    # a mirror the planner commands appears at once (a signed MirrorCommand as the
    # planner publishes it), then with the state its executor reports; commanded time in
    # the viewer's zone
    from processors.signing import Signer, generate_keypair

    commanded = int(time.time() * 1000)
    command = Signer("planner-1", generate_keypair()[0]).sign({
        "command_id": "c1", "action": "ACTIVATE", "api": "orders", "region": "eu",
        "bundle_digest": "sha256:" + "0" * 64, "desired_instances": 1, "sequence": 1,
        "issued_at": commanded, "expires_at": commanded + 60_000,
        "reason": "predicted 105 req/s > 100 req/s", "central_capacity_rps": 100.0,
        "forecast": [], "key_id": "", "signature": b""})
    produce("mirror-commands", "MirrorCommand", command, "eu")
    wait(lambda: text(browser, 'tr[data-region="eu"][data-api="orders"][data-state="COMMANDED"]'),
         10, "the commanded mirror's row")
    status = {"executor_id": "x1", "region": "eu", "api": "orders", "command_id": "c1",
              "sequence": 1, "state": "STARTING", "at": commanded + 300, "instance_url": None,
              "bundle_digest": None, "reason": "predicted 105 req/s > 100 req/s",
              "capacity_rps": None}
    produce("mirror-status", "MirrorStatus", status, "eu")
    produce("mirror-status", "MirrorStatus",
            {**status, "state": "READY", "at": commanded + 800, "sequence": 2,
             "instance_url": "http://127.0.0.1:9/", "capacity_rps": 80.0}, "eu")
    mirror = wait(lambda: text(
        browser, 'tr[data-region="eu"][data-api="orders"][data-state="READY"]'),
        10, "the mirror row")
    local = datetime.fromtimestamp(commanded / 1000, ZoneInfo(ZONE))
    assert "● ready" in mirror
    assert local.strftime("%I:%M:%S") in mirror or local.strftime("%H:%M:%S") in mirror
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(3000, height + 120))  # the whole page, once
    browser.save_screenshot(str(OUT / "controlroom-full-1280.png"))
    browser.set_window_size(1280, 800)

    # no more scores: once the 3-s score of orders-eu-1 expires, the banner says so
    # (the page's own clock or the API's next view, whichever first: the same words)
    banner = wait(lambda: text(browser, '#banners [data-kind="stale"]'), 8,
                  "the stale-score banner")
    assert "⚠ Stale scores: 1 of 3 endpoint(s) past valid_until (orders-eu-1" in banner
    assert "stale" in dict(overview_rows(browser))["orders-eu-1"]["flags"]
    browser.save_screenshot(str(OUT / "controlroom-stale-1280x800.png"))
    browser.set_window_size(390, 844)
    time.sleep(0.5)
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    browser.save_screenshot(str(OUT / "controlroom-phone.png"))
    assert overflow <= 1, f"the page is {overflow} px wider than a phone"
    browser.set_window_size(1280, 800)
    errors = severe(browser.get_log("browser"))
    assert not errors, errors
    return chart_s


def _restart(browser: Any, port: int, kafka: KafkaSettings, codec: Codec) -> None:
    """The API has stopped: the page says so and greys what it shows; the API comes back
    on the same port: the page reconnects by itself and is live again."""
    from selenium.webdriver.common.by import By

    gone = wait(lambda: text(browser, '#banners [data-kind="disconnected"]'), 8,
                "the API-unreachable banner")
    assert "API unreachable" in gone and "not live" in gone
    assert "disconnected" in browser.find_element(By.TAG_NAME, "body").get_attribute("class")
    assert "reconnecting" in (text(browser, "#conn") or "")
    browser.save_screenshot(str(OUT / "controlroom-api-down.png"))
    with api_in_thread(port, kafka, codec):
        wait(lambda: (text(browser, "#conn") or "").endswith("live")
             and text(browser, '#banners [data-kind="disconnected"]') is None
             and len(overview_rows(browser)) == 3,
             20, "the page live again after the API restarted")
    # while the API was down the browser logged its refused reconnections, nothing else
    errors = [e for e in severe(browser.get_log("browser"))
              if "/ui/events" not in e.get("message", "")]
    assert not errors, errors


class TelemetryFeed:
    """One-second telemetry windows of ``rates`` (endpoint -> requests/s) up to the last
    whole second, as an edge agent publishes them: first ``backlog_s`` seconds of
    history, then live from a thread until :meth:`stop`."""

    def __init__(self, kafka: KafkaSettings, codec: Codec, rates: dict[str, float],
                 backlog_s: int = 20) -> None:
        self.kafka, self.codec, self.rates = kafka, codec, rates
        self.producer = Producer({"bootstrap.servers": kafka.bootstrap_servers,
                                  "linger.ms": 5})
        self.next_s = int(time.time()) - backlog_s
        self._stop = threading.Event()
        self._publish()
        self._thread = threading.Thread(target=self._run, name="ui-telemetry", daemon=True)
        self._thread.start()

    def _publish(self) -> None:
        topic = topic_name(self.kafka, "telemetry")
        while self.next_s < int(time.time()):
            for endpoint, rate in self.rates.items():
                w = window(endpoint, 0, self.next_s * 1000, n=round(rate), agent_id="ui")
                w.update(window_end=w["window_start"] + 1000, interval_ms=1000)
                self.producer.produce(topic, self.codec.encode("EndpointTelemetry", w),
                                      endpoint.encode())
            self.next_s += 1
        assert self.producer.flush(10) == 0

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self._publish()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_control_room_follows_a_real_worker(kafka: KafkaSettings, codec: Codec,
                                            tmp_path: Path) -> None:
    """A real ``loadcast worker`` turns telemetry into scores: the page lists its
    endpoints with the API's numbers, its charts follow the new scores within 5 s, and
    when the worker stops, the stale-score banner names them."""
    capacity = {"w-1": 40.0, "w-2": 100.0}
    env = kafka_env(kafka, LOADCAST_PROCESSOR__APP_ID=f"ui-{uuid.uuid4().hex[:6]}",
                    LOADCAST_PROCESSOR__STEP_SECONDS="1", LOADCAST_PROCESSOR__HORIZON="5",
                    LOADCAST_PROCESSOR__SEASON_SECONDS="60",
                    LOADCAST_PROCESSOR__LATENESS_SECONDS="0",
                    LOADCAST_PROCESSOR__MIN_CHANGE="0",
                    LOADCAST_PROCESSOR__SCORE_VALIDITY_SECONDS="5",
                    LOADCAST_PROCESSOR__CAPACITY_RPS=json.dumps(capacity))
    log = tmp_path / "worker.log"
    with log.open("ab") as f:
        worker = subprocess.Popen([sys.executable, "-m", "loadcast", "worker"], env=env,
                                  stdout=f, stderr=subprocess.STDOUT)
    feed = None
    try:
        feed = TelemetryFeed(kafka, codec, {"w-1": 30.0, "w-2": 10.0})
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with api_in_thread(port, kafka, codec) as svc, chromium(1280, 800) as browser:
            wait(lambda: worker.poll() is None and {"w-1", "w-2"} <= set(svc.state.scores),
                 60, f"scores of the worker (see {log})")
            browser.get(f"{url}/ui")
            wait(lambda: len(overview_rows(browser)) == 2, 10, "two overview rows")
            # live: the chart of w-1 shows the API's newest score within 5 s
            for _ in range(2):
                newest = svc.state.scores["w-1"].computed_at
                wait(partial(lambda n: chart_last_t(browser, "w-1") >= n, newest), 5,
                     "the chart taking the worker's score")
                wait(partial(lambda n: svc.state.scores["w-1"].computed_at > n, newest), 15,
                     "a newer score from the worker")
            # the worker stops: once the numbers settle, the page shows the API's, and
            # the banner names both endpoints when their scores expire
            feed.stop()
            stop_process(worker, 30, sig=signal.SIGTERM, kill_wait_s=10, close_pipes=False)
            banner = wait(lambda: (b := text(browser, '#banners [data-kind="stale"]'))
                          and "2 of 2" in b and b, 15, "the stale-score banner")
            assert "w-1" in banner and "w-2" in banner
            with urllib.request.urlopen(f"{url}/ui/state.json", timeout=5) as r:
                view = json.load(r)
            rows = overview_rows(browser)
            assert [e for e, _ in rows] == [r["endpoint_id"] for r in view["overview"]]
            for r, (_, cells) in zip(view["overview"], rows, strict=True):
                assert r["capacity_rps"] == capacity[r["endpoint_id"]]
                assert r["capacity_source"] == "CONFIGURED"
                assert cells["current_rps"] == f"{fmt_num(r['current_rps'])} req/s"
                assert cells["capacity_rps"].startswith(f"{fmt_num(r['capacity_rps'])} req/s")
                assert cells["forecast"].startswith(f"{fmt_num(r['forecast']['mean'])} req/s")
                assert "stale" in cells["flags"]
            browser.save_screenshot(str(OUT / "controlroom-worker-stopped.png"))
            assert not severe(browser.get_log("browser"))
    finally:
        if feed is not None:
            feed.stop()
        stop_process(worker, 30, sig=signal.SIGTERM, kill_wait_s=10, close_pipes=False)
