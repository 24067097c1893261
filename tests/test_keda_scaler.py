"""The KEDA external scaler of ``loadcast api``: a real gRPC client (the generated stub over
``grpc.aio.insecure_channel`` to 127.0.0.1) against the real server in :class:`ApiService`,
fed LoadScores from the embedded broker; the generated code matches the vendored proto."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from confluent_kafka import Producer
from grpc import aio

from processors.autoscaling import MetadataError, parse_metadata
from schemas.codec import Codec
from streams.api.config import ApiSettings
from streams.api.keda import externalscaler_pb2 as pb
from streams.api.keda import externalscaler_pb2_grpc as pb_grpc
from streams.api.service import ApiService
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name

ROOT = Path(__file__).resolve().parents[1]
KEDA = ROOT / "streams" / "api" / "keda"
STEP_MS = 60_000


async def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def forecast_score(endpoint_id: str, means: list[float], *, api: str = "orders",
                   region: str = "eu", at_ms: int, valid_for_s: float = 600.0,
                   current_rps: float = 10.0) -> dict[str, Any]:
    """A LoadScore record with forecast points every minute from ``at_ms`` + 1 min; the
    upper band is mean * 1.2."""
    return {
        "endpoint_id": endpoint_id, "api": api, "region": region,
        "computed_at": at_ms, "valid_until": at_ms + int(valid_for_s * 1000),
        "score": 0.5, "capacity_rps": 1000.0, "capacity_source": "CONFIGURED",
        "current_rps": current_rps, "predicted_utilization": 0.3,
        "latency_p99_ms": 5.0, "error_rate": 0.0, "anomaly_score": 0.0,
        "step_seconds": STEP_MS // 1000, "model": "test", "reasons": [],
        "forecast": [{"horizon": h, "at": at_ms + h * STEP_MS, "mean": m,
                      "lower": m * 0.8, "upper": m * 1.2}
                     for h, m in enumerate(means, start=1)],
    }


def ref(**meta: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="orders", namespace="shop", scalerMetadata=meta)


class Rig:
    """The API with its scaler on the embedded broker, a producer, and a real stub."""

    def __init__(self, svc: ApiService, producer: Producer, topic: str, codec: Codec,
                 stub: pb_grpc.ExternalScalerStub) -> None:
        self.svc, self.producer, self.topic, self.codec, self.stub = (
            svc, producer, topic, codec, stub)

    async def produce(self, *records: dict[str, Any]) -> None:
        """Produce scores and wait until the API state holds them."""
        for r in records:
            self.producer.produce(self.topic, self.codec.encode("LoadScore", r),
                                  r["endpoint_id"].encode())
        assert self.producer.flush(10) == 0

        def arrived() -> bool:
            return all((s := self.svc.state.scores.get(r["endpoint_id"])) is not None
                       and s.computed_at >= r["computed_at"] for r in records)

        await wait_for(arrived, 15)


@pytest_asyncio.fixture
async def rig(kafka: KafkaSettings, codec: Codec) -> AsyncIterator[Rig]:
    svc = ApiService(ApiSettings(port=0, keda_port=0), kafka, codec=codec,
                     client_id="keda-test")
    await svc.start()
    try:
        assert svc.keda_port > 0
        async with aio.insecure_channel(f"127.0.0.1:{svc.keda_port}") as channel:
            producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
            yield Rig(svc, producer, topic_name(kafka, "load-scores"), codec,
                      pb_grpc.ExternalScalerStub(channel))
    finally:
        await svc.stop()
    assert svc.keda_port == 0


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(aio.AioRpcError) as e:
        await call
    return e.value.code(), e.value.details() or ""


@pytest.mark.asyncio
async def test_scaler_serves_forecast_demand_and_flips_activity(
    rig: Rig, caplog: pytest.LogCaptureFixture,
) -> None:
    now = int(time.time() * 1000)
    await rig.produce(forecast_score("orders-eu-1", [100, 200, 300], at_ms=now),
                      forecast_score("orders-eu-2", [50, 60, 70], at_ms=now),
                      forecast_score("orders-us-1", [900, 900, 900], region="us", at_ms=now))
    meta = {"api": "orders", "region": "eu", "leadSeconds": "90", "targetPerReplica": "50",
            "band": "upper", "activationThreshold": "400",
            "scalerAddress": "loadcast-api.loadcast.svc:8091"}
    timeout = 5.0

    spec = await rig.stub.GetMetricSpec(ref(**meta), timeout=timeout)
    (ms,) = spec.metricSpecs
    assert (ms.metricName, ms.targetSizeFloat) == ("loadcast-orders-eu-upper-90s", 50.0)

    # now + 90 s: the first point at or after it is the one at +120 s (horizon 2), upper band
    got = await rig.stub.GetMetrics(pb.GetMetricsRequest(
        scaledObjectRef=ref(**meta), metricName=ms.metricName), timeout=timeout)
    (mv,) = got.metricValues
    assert mv.metricName == ms.metricName
    assert mv.metricValueFloat == pytest.approx(200 * 1.2 + 60 * 1.2)  # = 312, us not counted
    all_regions = await rig.stub.GetMetrics(pb.GetMetricsRequest(
        scaledObjectRef=ref(**{**meta, "region": "", "band": "mean"})), timeout=timeout)
    assert all_regions.metricValues[0].metricValueFloat == pytest.approx(200 + 60 + 900)

    assert (await rig.stub.IsActive(ref(**meta), timeout=timeout)).result is False
    stream = rig.stub.StreamIsActive(ref(**meta), timeout=30)
    try:
        first = await asyncio.wait_for(stream.read(), timeout)
        assert first.result is False
        # a newer score of one endpoint forecasts more: 250 * 1.2 + 72 = 372 -> 372 + 300
        await rig.produce(forecast_score("orders-eu-1", [250, 500, 250],
                                         at_ms=now + 1000))
        flipped = await asyncio.wait_for(stream.read(), timeout)
        assert flipped.result is True
    finally:
        stream.cancel()
    assert (await rig.stub.IsActive(ref(**meta), timeout=timeout)).result is True
    got = await rig.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(**meta)),
                                    timeout=timeout)
    assert got.metricValues[0].metricValueFloat == pytest.approx(500 * 1.2 + 60 * 1.2)

    # a stale forecast is not used: the endpoint's current rate is, and the log says so
    await rig.produce(forecast_score("legacy-1", [999], api="legacy", at_ms=now - 120_000,
                                     valid_for_s=60, current_rps=42.0))
    with caplog.at_level(logging.WARNING, logger="streams.api.scaler"):
        got = await rig.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(
            api="legacy", leadSeconds="0", targetPerReplica="10")), timeout=timeout)
    assert got.metricValues[0].metricValueFloat == 42.0
    assert "forecast stale" in caplog.text and "legacy-1" in caplog.text

    # errors are statuses naming what is wrong
    code, details = await status_of(rig.stub.GetMetrics(pb.GetMetricsRequest(
        scaledObjectRef=ref(**{**meta, "targetPerReplica": "0"})), timeout=timeout))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'targetPerReplica'" in details
    code, details = await status_of(rig.stub.IsActive(
        ref(**{k: v for k, v in meta.items() if k != "leadSeconds"}), timeout=timeout))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'leadSeconds'" in details
    code, details = await status_of(rig.stub.GetMetricSpec(ref(**{**meta, "band": "p99"}),
                                                           timeout=timeout))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'band'" in details
    code, details = await status_of(rig.stub.GetMetrics(pb.GetMetricsRequest(
        scaledObjectRef=ref(**{**meta, "api": "nope"})), timeout=timeout))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in details
    code, _ = await status_of(rig.stub.StreamMetricSpec(ref(**meta), timeout=5).read())
    assert code == grpc.StatusCode.UNIMPLEMENTED  # KEDA then polls GetMetricSpec
    bad_stream = rig.stub.StreamIsActive(ref(**{**meta, "leadseconds": "60"}), timeout=5)
    code, details = await status_of(bad_stream.read())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'leadseconds'" in details


@pytest.mark.parametrize(("meta", "key"), [
    ({"leadSeconds": "60", "targetPerReplica": "5"}, "api"),
    ({"api": "a", "targetPerReplica": "5"}, "leadSeconds"),
    ({"api": "a", "leadSeconds": "-1", "targetPerReplica": "5"}, "leadSeconds"),
    ({"api": "a", "leadSeconds": "1e9", "targetPerReplica": "5"}, "leadSeconds"),
    ({"api": "a", "leadSeconds": "60", "targetPerReplica": "nan"}, "targetPerReplica"),
    ({"api": "a", "leadSeconds": "60", "targetPerReplica": "x"}, "targetPerReplica"),
    ({"api": "a", "leadSeconds": "60", "targetPerReplica": "5", "band": "lower"}, "band"),
    ({"api": "a", "leadSeconds": "60", "targetPerReplica": "5",
      "activationThreshold": "-3"}, "activationThreshold"),
    ({"api": "a", "leadSeconds": "60", "targetPerReplica": "5", "target_per_replica": "9"},
     "target_per_replica"),
])
def test_bad_metadata_names_the_key(meta: dict[str, str], key: str) -> None:
    with pytest.raises(MetadataError) as e:
        parse_metadata(meta)
    assert e.value.key == key and repr(key) in str(e.value)


def test_generated_code_matches_the_vendored_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) regenerates")
    (tmp_path / KEDA.relative_to(ROOT)).mkdir(parents=True)
    proto = KEDA.relative_to(ROOT) / "externalscaler.proto"
    shutil.copy(ROOT / proto, tmp_path / proto)
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", str(proto)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    generated = sorted(p.name for p in (tmp_path / proto.parent).glob("*_pb2*"))
    assert generated == ["externalscaler_pb2.py", "externalscaler_pb2.pyi",
                         "externalscaler_pb2_grpc.py"]
    for name in generated:
        assert (tmp_path / proto.parent / name).read_bytes() == (KEDA / name).read_bytes(), (
            f"{name} differs from what the proto generates: regenerate (streams/api/keda/"
            "__init__.py says how) with the grpcio-tools version pinned in pyproject.toml")
    # the service is KEDA's, whatever path the proto is compiled from
    assert pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name == (
        "externalscaler.ExternalScaler")


@pytest.mark.asyncio
async def test_a_taken_keda_port_is_an_error_not_a_shared_port() -> None:
    from streams.api.scaler import start_scaler
    from streams.api.state import ForecastState

    state = ForecastState()
    first, port = await start_scaler(state, "127.0.0.1", 0, max_concurrent_rpcs=4)
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start_scaler(state, "127.0.0.1", port, max_concurrent_rpcs=4)
    finally:
        await first.stop(None)


@pytest.mark.slow
def test_loadcast_api_serves_the_scaler_on_keda_port_and_no_keda_turns_it_off(
    kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from loadcast.cli import app

    monkeypatch.setenv("LOADCAST_KAFKA__TOPIC_PREFIX", kafka.topic_prefix)
    base = ["api", "-b", kafka.bootstrap_servers, "--port", "0", "--duration", "0.3"]
    on = CliRunner().invoke(app, [*base, "--keda-port", "0"])
    assert on.exit_code == 0, on.output
    assert "keda external scaler (gRPC) on 127.0.0.1:" in on.output
    off = CliRunner().invoke(app, [*base, "--no-keda"])
    assert off.exit_code == 0, off.output
    assert "api on http://127.0.0.1:" in off.output and "keda" not in off.output
    same = CliRunner().invoke(app, ["api", "-b", kafka.bootstrap_servers, "--port", "18170",
                                    "--keda-port", "18170", "--duration", "0.3"])
    assert same.exit_code == 2 and "keda_port" in same.output, same.output
