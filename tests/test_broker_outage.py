"""A broker outage is survived: real ``loadcast`` agent, worker, sink and sidecar
processes; the embedded broker is SIGKILLed under them and started again, empty, on the
same port (``benchmarks/outage.py --quick``). Bounded logs, scoring resumes within 15 s,
the agent's buffered windows arrive, SIGTERM ends each process within 10 s (broker up and
broker gone). Plus the pieces in-process: the log bound, and a producer whose broker lost
its state delivering its buffer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from streams.kafka.broker import EmbeddedBroker
from streams.kafka.brokerwatch import BrokerWatch
from streams.kafka.producer import RecordProducer
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name
from tests.kafka_helpers import read_topic

REPO = Path(__file__).resolve().parents[1]


def test_lost_broker_is_logged_once_then_every_30_s_with_a_count(caplog) -> None:  # type: ignore[no-untyped-def]
    w = BrokerWatch("t")
    with caplog.at_level("WARNING", logger="loadcast.broker"):
        logged = [w.failure("Connect to 127.0.0.1:1 failed: Connection refused", now=t / 10)
                  for t in range(0, 650)]  # 80 errors a second for 65 s
    assert sum(logged) == 3  # at 0 s, 30 s, 60 s
    assert len(caplog.records) == 3
    assert "650" not in caplog.records[0].getMessage()
    assert "(601 errors so far)" in caplog.records[2].getMessage()


def test_producer_delivers_its_buffer_after_the_broker_returns_empty(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_dir=tmp_path).start()
    port = broker.port
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix="out.",
                              partitions=3)
        ensure_topics(kafka)
        w = BrokerWatch("t")
        w.attach(kafka)
        p = RecordProducer(kafka, "t-out")
        w.on_return(p._broker_back, weak=True)  # as the process-wide watch does
        topic = topic_name(kafka, "telemetry")
        for i in range(5):
            p.produce(topic, b"before-%d" % i, b"k%d" % i)
        assert p.flush(10) == 0
        assert broker.process is not None
        os.killpg(broker.process.pid, signal.SIGKILL)
        broker.stop()
        for i in range(20):
            p.produce(topic, b"during-%d" % i, b"k%d" % i)
        w.failure("Connect to broker failed: Connection refused")  # what the clients report
        broker = EmbeddedBroker(port=port, log_dir=tmp_path).start()
        t0 = time.monotonic()
        assert p.flush(30) == 0
        assert time.monotonic() - t0 < 15
        assert not w.lost
        assert p.stats.delivered == 25 and p.stats.failed == 0
        values = sorted(m.value() or b"" for m in read_topic(broker.bootstrap, topic,
                                                             timeout=20, min_records=20))
        assert values == sorted(b"during-%d" % i for i in range(20))
    finally:
        broker.stop()


def test_outage_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "outage.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.outage", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert out.exists(), proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    v = r["verdict"]
    assert v["resume_within_15s"], (r.get("resume_scoring_s"), r.get("log_samples"))
    assert v["agent_buffer_delivered"], r
    assert v["sigterm_within_10s"], r
    assert v["bounded_logs"], (r["log_lines"], r["log_samples"])
    assert v["all_alive_after_return"], r
    assert proc.returncode == 0, proc.stdout
