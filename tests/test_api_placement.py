"""``POST /v1/optimize/placement`` and ``POST /v1/scenarios`` over a ForecastState fed
LoadScores (aiohttp test client), and placement end to end through ApiService on the
embedded broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer

from processors.mirroring import BundleSpec, MirrorPlanner, PlannerConfig
from processors.signing import Signer, generate_keypair
from schemas.codec import Codec
from streams.api import placement, scenarios
from streams.api.app import STATE, create_app
from streams.api.config import ApiSettings
from streams.api.service import ApiService
from streams.api.state import ForecastState
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name

STEP = 60


def score(eid: str, api: str, region: str, capacity: float, means: list[float], *,
          band: float = 10.0, now: int | None = None, valid_s: float = 300) -> dict[str, Any]:
    """A LoadScore record with a forecast of ``means`` (one per step), band +-``band``."""
    now = now if now is not None else int(time.time() * 1000)
    return {
        "endpoint_id": eid, "api": api, "region": region, "computed_at": now,
        "valid_until": now + int(valid_s * 1000), "score": 0.5, "capacity_rps": capacity,
        "capacity_source": "CONFIGURED", "current_rps": means[0],
        "predicted_utilization": means[0] / capacity, "latency_p99_ms": 5.0,
        "error_rate": 0.0, "anomaly_score": 0.0, "step_seconds": STEP,
        "forecast": [{"horizon": h, "at": now + h * STEP * 1000, "mean": m,
                      "lower": max(0.0, m - band), "upper": m + band}
                     for h, m in enumerate(means, 1)],
        "model": "test", "reasons": [],
    }


SCORES = [
    score("orders-eu-1", "orders", "eu", 100.0, [40, 50, 60]),
    score("orders-eu-2", "orders", "eu", 100.0, [20, 30, 95]),
    score("orders-us-1", "orders", "us", 200.0, [100, 100, 100]),
]


@pytest_asyncio.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    state = ForecastState()
    state.apply([("LoadScore", s) for s in SCORES])
    app = create_app(state, ApiSettings(placement_max_sources=50, scenario_max_changes=3))
    placement.add_routes(app)
    scenarios.add_routes(app)
    scenarios.set_planner(app, PlannerConfig(
        bundles={"orders": BundleSpec("sha256:" + "a" * 64, 50.0, 1, 4)},
        activation_seconds=120, margin_seconds=60))
    async with TestClient(TestServer(app)) as c:
        yield c


async def post(c: TestClient[Any, Any], path: str, body: Any) -> tuple[int, Any]:
    r = await c.post(path, json=body)
    return r.status, await r.json()


@pytest.mark.asyncio
async def test_placement_from_forecasts_and_scored_capacity(client: TestClient[Any, Any]
                                                            ) -> None:
    body = {
        "sources": [
            {"id": "eu", "api": "orders", "region": "eu", "horizon": 2},      # 50 + 30
            {"endpoint_id": "orders-us-1", "lead_seconds": 90, "band": "upper"},  # 110
            {"id": "batch", "demand": 15},
        ],
        "targets": [{"endpoint_id": "orders-eu-1"}, {"id": "big", "capacity": 130}],
        "cost": [[1, 5], [2, 1], [None, 3]],
    }
    status, out = await post(client, placement.PATH, body)
    assert status == 200, out
    assert out["method"] == "gap-milp" and out["optimal"]
    by = {a["source"]: a for a in out["assignments"]}
    assert by["eu"]["demand"] == 80 and by["orders-us-1"]["demand"] == 110
    # us (110) fits only "big" (130), batch may only go there (125); eu then takes eu-1
    assert [by[s]["target"] for s in ("eu", "orders-us-1", "batch")] == \
        ["orders-eu-1", "big", "big"]
    assert out["total_cost"] == pytest.approx(80 * 1 + 110 * 1 + 15 * 3)
    assert by["eu"]["stale"] is False
    loads = {t["target"]: t for t in out["targets"]}
    assert all(t["load"] <= t["capacity"] + 1e-9 for t in loads.values())
    assert out["total_cost"] == pytest.approx(sum(a["cost"] for a in out["assignments"]))


@pytest.mark.asyncio
async def test_placement_split_and_utilization(client: TestClient[Any, Any]) -> None:
    body = {"sources": [{"demand": 30}, {"demand": 30}],
            "targets": [{"capacity": 40}, {"capacity": 40}],
            "cost": [[1, 2], [1, 3]], "split": True}
    status, out = await post(client, placement.PATH, body)
    assert status == 200, out
    assert out["method"] == "transport"
    # cheapest: both want target 0 (cap 40); source 0 loses less moving (2-1 < 3-1)
    a0, a1 = out["assignments"]
    assert a1["target"] == "0" and a0["target"] is None
    assert {s["target"]: s["demand"] for s in a0["shares"]} == \
        pytest.approx({"0": 10.0, "1": 20.0})
    assert out["total_cost"] == pytest.approx(10 * 1 + 20 * 2 + 30 * 1)
    assert [t["utilization"] for t in out["targets"]] == pytest.approx([1.0, 0.5])


@pytest.mark.asyncio
async def test_placement_errors_name_the_field(client: TestClient[Any, Any]) -> None:
    ok_target = [{"capacity": 10}]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"sources": [{"demand": 30}], "targets": [{"capacity": 10}, {"capacity": 5}],
          "cost": [[1, 1]]}, 422, "sources"),                           # infeasible by 15
        ({"sources": [{"demand": 1}], "targets": ok_target, "cost": [[1, 2]]}, 422, "cost.0"),
        ({"sources": [{"demand": 1}, {"demand": 1}], "targets": ok_target, "cost": [[1]]},
         422, "cost"),
        ({"sources": [{"demand": -1}], "targets": ok_target, "cost": [[1]]}, 422,
         "sources.0.demand"),
        ({"sources": [{"api": "nope"}], "targets": ok_target, "cost": [[1]]}, 422,
         "sources.0"),
        ({"sources": [{"endpoint_id": "orders-eu-1", "horizon": 9}], "targets": ok_target,
          "cost": [[1]]}, 422, "sources.0.horizon"),
        ({"sources": [{"demand": 1}], "targets": [{"endpoint_id": "x"}], "cost": [[1]]},
         422, "targets.0.endpoint_id"),
        ({"sources": [{"demand": 1}] * 51, "targets": ok_target, "cost": [[1]] * 51}, 413,
         "sources"),
    ]
    for body, want, field in cases:
        status, out = await post(client, placement.PATH, body)
        assert (status, out.get("field")) == (want, field), (body, out)
    status, out = await post(client, placement.PATH, cases[0][0])
    assert out["shortfall"] == pytest.approx(15.0) and "by 15" in out["error"]


def commands_of(out: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    return [(c["action"], c["api"], c["region"], c["desired_instances"])
            for c in out["commands"]]


def region(out: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in out["regions"] if r["region"] == name)


def endpoint(out: dict[str, Any], eid: str) -> dict[str, Any]:
    return next(e for e in out["endpoints"] if e["endpoint_id"] == eid)


def utils(view: dict[str, Any]) -> list[float]:
    return [p["utilization"] for p in view["points"]]


@pytest.mark.asyncio
async def test_scenario_factor_remove_and_mirror(client: TestClient[Any, Any]) -> None:
    status, out = await post(client, scenarios.PATH, {
        "changes": [{"kind": "demand_factor", "factor": 2, "region": "eu"}]})
    assert status == 200, out
    base, new = out["baseline"], out["scenario"]
    for eid in ("orders-eu-1", "orders-eu-2"):
        assert utils(endpoint(new, eid)) == pytest.approx(
            [2 * u for u in utils(endpoint(base, eid))])
    assert utils(endpoint(new, "orders-us-1")) == utils(endpoint(base, "orders-us-1"))
    assert utils(region(new, "eu")) == pytest.approx(
        [2 * u for u in utils(region(base, "eu"))], rel=1e-5)  # rounded to 6 places
    assert endpoint(new, "orders-eu-1")["overload_horizons"] == [2, 3]  # upper 100 = cap
    assert region(new, "eu")["overload_windows"] and not region(base, "eu")["overload_windows"]
    assert commands_of(new) == [("ACTIVATE", "orders", "eu", 4)] and not base["commands"]

    status, out = await post(client, scenarios.PATH, {
        "changes": [{"kind": "remove_target", "endpoint_id": "orders-eu-2"}]})
    assert status == 200, out
    base, new = out["baseline"], out["scenario"]
    assert "orders-eu-2" not in {e["endpoint_id"] for e in new["endpoints"]}
    for eid in ("orders-eu-1", "orders-us-1"):  # spread by capacity: 1/3 and 2/3
        assert all(n > b for n, b in zip(utils(endpoint(new, eid)),
                                         utils(endpoint(base, eid)), strict=True))
    assert endpoint(new, "orders-eu-1")["points"][0]["mean"] == pytest.approx(40 + 20 / 3)

    status, out = await post(client, scenarios.PATH, {"changes": [
        {"kind": "add_mirror", "api": "orders", "region": "eu", "capacity_rps": 200}]})
    assert status == 200, out
    base, new = region(out["baseline"], "eu"), region(out["scenario"], "eu")
    assert (base["capacity_rps"], new["capacity_rps"]) == (200, 400)
    assert utils(new) == pytest.approx([u / 2 for u in utils(base)], rel=1e-5)
    assert utils(region(out["scenario"], "us")) == utils(region(out["baseline"], "us"))
    status, out = await post(client, scenarios.PATH, {"baseline": False, "changes": []})
    assert status == 200 and "baseline" not in out, out


@pytest.mark.asyncio
async def test_scenario_commands_are_the_planners(client: TestClient[Any, Any]) -> None:
    """The command list equals processors.mirroring's planner on the same input."""
    body = {"changes": [{"kind": "demand_factor", "factor": 1.5},
                        {"kind": "add_mirror", "api": "orders", "region": "us",
                         "capacity_rps": 10}],
            "bundles": {"orders": {"instance_capacity_rps": 40, "max_instances": 9}}}
    status, out = await post(client, scenarios.PATH, body)
    assert status == 200, out
    cfg = PlannerConfig(bundles={"orders": BundleSpec("sha256:" + "a" * 64, 40.0, 1, 9)},
                        activation_seconds=120, margin_seconds=60)
    planner = MirrorPlanner(cfg, Signer("k", generate_keypair()[0]))
    now = out["now"]
    for s in SCORES:
        rec = {**s, "current_rps": s["current_rps"] * 1.5, "forecast": [
            {**p, **{k: p[k] * 1.5 for k in ("mean", "lower", "upper")}}
            for p in s["forecast"]]}
        planner.observe_score(rec, now_ms=now)
        if s["endpoint_id"] == "orders-us-1":  # the mirror, as the scenario names it
            planner.observe_score({**rec, "endpoint_id": "orders-mirror-us-scenario-1",
                                   "capacity_rps": 10.0, "current_rps": 0.0},
                                  now_ms=now)
    want = planner.evaluate(now)
    assert want and [(c["action"], c["api"], c["region"], c["desired_instances"], c["reason"])
                     for c in want] == \
        [(c["action"], c["api"], c["region"], c["desired_instances"], c["reason"])
         for c in out["scenario"]["commands"]]
    assert "signature" not in out["scenario"]["commands"][0]


@pytest.mark.asyncio
async def test_scenario_errors(client: TestClient[Any, Any]) -> None:
    for body, want, field in [
        ({"changes": [{"kind": "remove_target", "endpoint_id": "nope"}]}, 422, "changes.0"),
        ({"changes": [{"kind": "demand_factor", "factor": 1},
                      {"kind": "add_mirror", "api": "orders", "region": "ap",
                       "capacity_rps": 5}]}, 422, "changes.1"),
        ({"changes": [{"kind": "demand_factor", "factor": -1}]}, 422,
         "changes.0.demand_factor.factor"),
        ({"changes": [{"kind": "demand_factor", "factor": 1}] * 4}, 413, "changes"),
    ]:
        status, out = await post(client, scenarios.PATH, body)
        assert (status, out.get("field")) == (want, field), (body, out)


@pytest.mark.asyncio
async def test_placement_end_to_end(kafka: KafkaSettings, codec: Codec) -> None:
    """Scores on the embedded broker reach ApiService; placement uses their forecasts."""
    svc = ApiService(ApiSettings(port=0), kafka, codec=codec, client_id="api-placement")
    await svc.start()
    try:
        p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
        for s in SCORES:
            p.produce(topic_name(kafka, "load-scores"), codec.encode("LoadScore", s),
                      s["endpoint_id"].encode())
        assert p.flush(10) == 0
        deadline = time.monotonic() + 15
        while len(svc.state.scores) < 3:
            assert time.monotonic() < deadline, "scores did not arrive"
            await asyncio.sleep(0.05)
        body = {"sources": [{"endpoint_id": e, "horizon": 3} for e in
                            ("orders-eu-1", "orders-eu-2", "orders-us-1")],
                "targets": [{"endpoint_id": "orders-us-1"}, {"capacity": 100}],
                "cost": [[1, 2], [1, 2], [1, 2]]}
        url = f"http://127.0.0.1:{svc.port}{placement.PATH}"
        async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
            out = await r.json()
            assert r.status == 200, out
        # demands 60, 95, 100 at horizon 3; capacities 200 (cost 1) and 100 (cost 2):
        # the cheapest fit puts 95 + 100 on the first, 60 on the second
        assert [a["target"] for a in out["assignments"]] == ["1", "orders-us-1", "orders-us-1"]
        assert out["total_cost"] == pytest.approx(60 * 2 + 95 + 100)
    finally:
        await svc.stop()


@pytest.mark.asyncio
async def test_scenario_knows_running_mirrors(client: TestClient[Any, Any]) -> None:
    """A mirror reported READY is not commanded again; the others still are."""
    body = {"baseline": False, "changes": [{"kind": "demand_factor", "factor": 3}]}
    status, out = await post(client, scenarios.PATH, body)
    assert status == 200, out
    assert {(c["action"], c["region"]) for c in out["scenario"]["commands"]} == \
        {("ACTIVATE", "eu"), ("ACTIVATE", "us")}
    assert client.app is not None
    state = client.app[STATE]
    now = int(time.time() * 1000)
    state.apply([("MirrorStatus", {
        "executor_id": "x", "region": "eu", "api": "orders", "command_id": "c1",
        "sequence": 1, "state": "READY", "at": now - 1000, "instance_url": None,
        "bundle_digest": None, "reason": "", "capacity_rps": 50.0})])
    status, out = await post(client, scenarios.PATH, body)
    assert status == 200, out
    # eu: already running with min_instances (1): a scale-up, not a new activation
    assert [(c["action"], c["region"], c["reason"].split(" ")[0])
            for c in out["scenario"]["commands"]] == \
        [("ACTIVATE", "eu", "peak"), ("ACTIVATE", "us", "predicted")]
