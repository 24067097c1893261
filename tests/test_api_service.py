"""``loadcast api``'s base: scores on the embedded broker reach the API's state and its
``/health``; a record that does not decode is dead-lettered and the rest still arrive."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from confluent_kafka import Producer

from schemas.codec import Codec
from streams.api.config import ApiSettings
from streams.api.service import ApiService
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from streams.sidecar.testing import score_record


async def wait_for(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_scores_reach_health_and_garbage_is_skipped(kafka: KafkaSettings,
                                                          codec: Codec) -> None:
    svc = ApiService(ApiSettings(port=0), kafka, codec=codec, client_id="api-test")
    await svc.start()
    try:
        p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
        topic = topic_name(kafka, "load-scores")
        now = int(time.time() * 1000)
        p.produce(topic, b"\x00garbage", b"x")
        for i, e in enumerate(("a", "b", "c")):
            p.produce(topic, codec.encode("LoadScore", score_record(e, 0.5, at_ms=now + i)),
                      e.encode())
        # an older score of "a" arrives late: it must not replace the newer one
        p.produce(topic, codec.encode("LoadScore", score_record("a", 0.1, at_ms=now - 5000)),
                  b"a")
        assert p.flush(10) == 0
        await wait_for(lambda: len(svc.state.scores) == 3 and svc.feed is not None
                       and svc.feed.skipped == 1, 15)
        assert svc.state.scores["a"].score == 0.5
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{svc.port}/health") as r:
                body = await r.json()
                assert r.status == 200, body
            async with http.get(f"http://127.0.0.1:{svc.port}/metrics") as r:
                text = await r.text()
        assert body["endpoints"] == 3 and body["newest_score_age_s"] < 30
        assert "loadcast_api_records_skipped_total{reason=" in text
    finally:
        await svc.stop()


def test_a_planner_command_shows_a_mirror_before_its_executor_reports() -> None:
    from processors.controlroom import mirror_rows
    from streams.api.state import ForecastState

    st = ForecastState()
    cmd = {"command_id": "c1", "action": "ACTIVATE", "api": "orders", "region": "eu",
           "issued_at": 1_000, "reason": "forecast over central capacity"}
    st.apply([("MirrorCommand", cmd)])
    (row,) = mirror_rows(({**m.__dict__} for m in st.mirrors.values()), {})
    assert (row["state"], row["activity"], row["commanded_at"]) == ("COMMANDED", "commanded",
                                                                    1_000)
    status = {"executor_id": "x", "region": "eu", "api": "orders", "command_id": "c1",
              "sequence": 1, "state": "READY", "at": 4_000, "instance_url": "http://m",
              "reason": "", "capacity_rps": 50.0}
    st.apply([("MirrorStatus", status)])
    st.apply([("MirrorCommand", cmd)])  # read again (a replay): the executor's word stays
    (row,) = mirror_rows(({**m.__dict__} for m in st.mirrors.values()), {})
    assert (row["state"], row["commanded_at"], row["ready_at"]) == ("READY", 1_000, 4_000)
