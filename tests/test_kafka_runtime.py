"""The Kafka runtime (streams/kafka/): clients, reading to the end, dead letters, the
reachability check, and that nothing else constructs Kafka clients or Faust apps."""

from __future__ import annotations

import ast
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from streams.kafka.runtime import KafkaRuntime, KafkaUnreachable
from streams.kafka.settings import KafkaSettings

REPO = Path(__file__).resolve().parents[1]

#: Calls that construct a Kafka client or a Faust app.
CONSTRUCTORS = {"Consumer", "Producer", "AdminClient", "DeserializingConsumer",
                "SerializingProducer"}
#: Where they may be called: the runtime only.
ALLOWED = {"streams/kafka/clients.py", "streams/kafka/runtime.py"}
SCANNED = ("streams", "processors", "sinks", "schemas", "loadcast")


def _constructions(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in CONSTRUCTORS or (
            name == "App" and isinstance(f, ast.Attribute)
            and isinstance(f.value, ast.Name) and f.value.id == "faust"
        ):
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}(")
    return found


def test_only_the_runtime_constructs_kafka_clients_and_faust_apps() -> None:
    found = []
    for root in SCANNED:
        for p in sorted((REPO / root).rglob("*.py")):
            if p.relative_to(REPO).as_posix() not in ALLOWED:
                found += _constructions(p)
    assert found == [], "use streams.kafka.runtime.KafkaRuntime instead:\n" + "\n".join(found)


def test_the_scan_sees_each_kind_of_construction(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import faust\nfrom confluent_kafka import Consumer, Producer\n"
                   "from confluent_kafka import admin\n"
                   "a = Consumer({})\nb = Producer({})\nc = admin.AdminClient({})\n"
                   "d = faust.App('x')\ne = RecordProducer(s, 'x')\n")
    found = [f.split(" ", 1)[1] for f in _constructions_at(src)]
    assert found == ["Consumer(", "Producer(", "AdminClient(", "App("]


def _constructions_at(path: Path) -> list[str]:
    global REPO
    saved, REPO = REPO, path.parent
    try:
        return _constructions(path)
    finally:
        REPO = saved


def test_read_to_end_returns_every_record_of_every_partition(kafka: KafkaSettings) -> None:
    rt = KafkaRuntime(kafka)
    topic = rt.topic("mirror-commands")
    p = rt.producer()
    for i in range(30):
        p.produce(topic, value=f"v{i}".encode(), key=f"k{i}".encode())
    assert p.flush(10) == 0
    t0 = time.monotonic()
    got = sorted(int((m.value() or b"")[1:]) for m in rt.read_to_end(topic, timeout=20))
    assert got == list(range(30))
    assert time.monotonic() - t0 < 15
    # only some partitions
    first = list(rt.read_to_end(topic, timeout=20, partitions=[0]))
    assert {m.partition() for m in first} <= {0}
    assert 0 < len(first) < 30


def test_read_to_end_of_a_missing_topic_says_so(kafka: KafkaSettings) -> None:
    with pytest.raises(KeyError, match="does not exist"):
        list(KafkaRuntime(kafka).read_to_end("no-such-topic-here", timeout=5))


def test_a_following_reader_picks_up_what_arrives_later(kafka: KafkaSettings) -> None:
    rt = KafkaRuntime(kafka)
    topic = rt.topic("global-model")
    rp = rt.record_producer("test-rt", linger_ms=0.0)
    rp.produce(topic, b"one", b"a")
    assert rp.flush(10) == 0
    with rt.reader(topic, follow=True) as r:
        assert [m.value() for m in r.read(10)] == [b"one"]
        assert r.at_end
        rp.produce(topic, b"two", b"a")
        assert rp.flush(10) == 0
        got: list[bytes | None] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got += [m.value() for m in r.read(1)]
        assert got == [b"two"]


def test_consumer_in_a_group_gets_the_subscribed_topic(kafka: KafkaSettings) -> None:
    rt = KafkaRuntime(kafka)
    topic = rt.topic("anomalies")
    p = rt.producer()
    p.produce(topic, value=b"x", key=b"k")
    assert p.flush(10) == 0
    c = rt.consumer("rt-test-group", topics=[topic])
    try:
        deadline = time.monotonic() + 20
        got: list[Any] = []
        while not got and time.monotonic() < deadline:
            got = [m for m in c.consume(10, 0.5) if m.error() is None]
        assert [m.value() for m in got] == [b"x"]
    finally:
        c.close()


def test_dead_letters_carry_the_standard_headers(kafka: KafkaSettings) -> None:
    rt = KafkaRuntime(kafka)
    producer = rt.record_producer("test-dlq", linger_ms=0.0)
    w = rt.dead_letter(producer, client="test-dlq")
    assert w.send(b"key", b"junk", reason="invalid", detail="bad magic",
                  source_topic=rt.topic("telemetry"), partition=2, offset=41)
    assert producer.flush(10) == 0
    (m,) = list(rt.read_to_end(rt.topic("dead-letter"), timeout=20))
    headers: list[tuple[str, bytes]] = m.headers() or []  # type: ignore[assignment]
    h = {k: v.decode() for k, v in headers}
    assert (m.key(), m.value()) == (b"key", b"junk")
    assert h["loadcast.reason"] == "invalid"
    assert h["loadcast.detail"] == "bad magic"
    assert h["loadcast.source_topic"] == rt.topic("telemetry")
    assert (h["loadcast.partition"], h["loadcast.offset"]) == ("2", "41")
    assert h["loadcast.consumer"] == "test-dlq"


def test_check_reachable(kafka: KafkaSettings) -> None:
    KafkaRuntime(kafka).check_reachable(10)
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = KafkaRuntime(kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}"}))
    t0 = time.monotonic()
    with pytest.raises(KafkaUnreachable, match=f"^cannot reach Kafka at 127.0.0.1:{port}: "):
        down.check_reachable(1.5)
    assert time.monotonic() - t0 < 10
    with pytest.raises(KafkaUnreachable, match=r"^cannot reach Kafka at "):
        down.ensure_topics(timeout=1.5)


def test_faust_app_has_loadcasts_settings(kafka: KafkaSettings) -> None:
    app = KafkaRuntime(kafka).faust_app("rt-test-app")
    assert app.conf.id == "rt-test-app"
    assert [str(u) for u in app.conf.broker] == [f"kafka://{kafka.bootstrap_servers}"]
    assert app.conf.broker_session_timeout == 6.0
    assert app.conf.topic_allow_declare is False
    assert app.conf.web_enabled is False


def test_two_threads_that_see_one_fatal_error_replace_the_producer_once(
    kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from streams.kafka.producer import RecordProducer

    rp = RecordProducer(kafka, "fatal-once")
    replaced: list[int] = []

    def slow_reset(timeout: float = 10.0, *, quiet: bool = False) -> int:
        replaced.append(1)
        time.sleep(0.2)  # the other thread arrives while this one replaces
        return 0

    monkeypatch.setattr(rp, "reset", slow_reset)
    rp._fatal = True  # as a delivery report of "the broker lost its state" leaves it
    threads = [threading.Thread(target=rp._recover) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(replaced) == 1 and not rp._fatal
    rp.flush(1)
