"""Running real `loadcast worker` processes against the test broker, and reading results."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.support.processes import kafka_env, stop_process
from benchmarks.support.records import window
from processors.endpoint import EndpointModel
from schemas.codec import Codec
from streams.edge.replay import read_trace
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.conftest import ELB
from tests.kafka_helpers import read_topic

STEP = 300  # model step in the tests: 5 windows of 60 s per step


def worker_env(kafka: KafkaSettings, app_id: str, **settings: str) -> dict[str, str]:
    """The worker's environment; ``settings`` are more processor settings
    (``global_trees="false"`` -> ``LOADCAST_PROCESSOR__GLOBAL_TREES=false``)."""
    return kafka_env(kafka, **{"LOADCAST_PROCESSOR__APP_ID": app_id,
                               "LOADCAST_PROCESSOR__STEP_SECONDS": str(STEP),
                               "LOADCAST_PROCESSOR__SEASON_SECONDS": "86400",
                               "LOADCAST_PROCESSOR__SNAPSHOT_EVERY_SECONDS": "0.5",
                               "LOADCAST_PROCESSOR__ANOMALY_WARMUP": "50",
                               **{f"LOADCAST_PROCESSOR__{k.upper()}": v
                                  for k, v in settings.items()}})


def start_worker(kafka: KafkaSettings, app_id: str, log: Path,
                 **settings: str) -> subprocess.Popen[bytes]:
    """A ``loadcast worker`` process (``settings``: see :func:`worker_env`)."""
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "loadcast", "worker"], env=worker_env(kafka, app_id, **settings),
            stdout=f, stderr=subprocess.STDOUT,
        )


def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    stop_process(p, timeout, sig=sig, kill_wait_s=10, close_pipes=False)


def new_app_id() -> str:
    return f"proc-{uuid.uuid4().hex[:6]}"


def make_windows(endpoints: list[str], start: int, count: int) -> list[dict[str, Any]]:
    """``count`` consecutive 60-s windows per endpoint, shaped by the real ELB trace."""
    values = [v for _, v in read_trace(ELB).rows]
    out = []
    for i in range(start, start + count):
        for k, endpoint in enumerate(endpoints):
            n = round(values[(i + 37 * k) % len(values)] * (1 + k / 4))
            out.append(window(endpoint, i, 1_700_000_000_000, n=n, agent_id="t"))
    return out


def produce(kafka: KafkaSettings, codec: Codec, windows: list[dict[str, Any]],
            raw: list[tuple[bytes, bytes]] | None = None) -> dict[int, int]:
    """Produce windows as single records (and optional raw (key, value) pairs); returns
    the highest offset written per partition."""
    topic = topic_name(kafka, "telemetry")
    p = RecordProducer(kafka, f"t-{uuid.uuid4().hex[:4]}")
    last: dict[int, int] = {}

    def track(err: Any, msg: Any) -> None:
        if err is None:
            last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())

    for w in windows:
        p._producer.produce(topic, codec.encode("EndpointTelemetry", w),
                            w["endpoint_id"].encode(), on_delivery=track)
        p._producer.poll(0)
    for key, value in raw or []:
        p._producer.produce(topic, value, key, on_delivery=track)
    assert p.flush(30) == 0
    return last


def checkpoints(kafka: KafkaSettings, codec: Codec) -> dict[int, int]:
    """Latest checkpoint offset per partition in the snapshot topic."""
    out: dict[int, int] = {}
    for m in read_topic(kafka.bootstrap_servers, topic_name(kafka, "processor-snapshots"), 10):
        if m.value() is None:  # a tombstone
            continue
        r = codec.decode(m.value() or b"")
        if r["endpoint_id"] is None and r["format"] == "none":
            out[r["source_partition"]] = r["offset"]
    return out


def wait_for_checkpoints(kafka: KafkaSettings, codec: Codec, ends: dict[int, int],
                         timeout: float = 90, proc: subprocess.Popen[bytes] | None = None
                         ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cp = checkpoints(kafka, codec)
        if all(cp.get(p, -1) >= o for p, o in ends.items()):
            return
        assert proc is None or proc.poll() is None, "worker died"
        time.sleep(0.5)
    raise AssertionError(f"checkpoints {checkpoints(kafka, codec)} never reached {ends}")


def final_models(kafka: KafkaSettings, codec: Codec) -> dict[str, EndpointModel]:
    """The newest snapshot of every endpoint, unpickled."""
    out: dict[str, EndpointModel] = {}
    for m in read_topic(kafka.bootstrap_servers, topic_name(kafka, "processor-snapshots"), 10):
        if m.value() is None:  # a tombstone
            continue
        r = codec.decode(m.value() or b"")
        if r["endpoint_id"] is not None:
            out[r["endpoint_id"]] = pickle.loads(r["state"])
    return out


def snapshot_trees(kafka: KafkaSettings, codec: Codec) -> dict[tuple[int, int], Any]:
    """The global trees in the snapshot topic, by (partition, version), tombstones
    applied."""
    out: dict[tuple[int, int], Any] = {}
    for m in read_topic(kafka.bootstrap_servers, topic_name(kafka, "processor-snapshots"), 10):
        key = (m.key() or b"").decode()
        if not key.startswith("__trees__/"):
            continue
        _, p, v = key.split("/")
        if m.value() is None:
            out.pop((int(p), int(v)), None)
        else:
            out[(int(p), int(v))] = pickle.loads(codec.decode(m.value() or b"")["state"])["trees"]
    return out


def scores(kafka: KafkaSettings, codec: Codec) -> list[dict[str, Any]]:
    msgs = read_topic(kafka.bootstrap_servers, topic_name(kafka, "load-scores"), 10)
    return [codec.decode(m.value() or b"", "LoadScore") for m in msgs]
