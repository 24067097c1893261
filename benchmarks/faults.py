"""Hostile input through real processes: malformed records interleaved with valid windows.

A real ``loadcast worker``, ``loadcast sink`` (embedded chDB) and ``loadcast sidecar``
(built-in proxy) run on the embedded broker (Tansu). The run produces ``--malformed``
malformed telemetry records of every kind below, interleaved with valid windows of a few
real endpoints, plus malformed LoadScores (``--bad-scores``) to the score topic, and then
checks, from what the processes wrote:

- every process stayed up, and its health endpoint answered 200 at every poll;
- every malformed telemetry record is in dead-letter **twice** with a reason: once from
  the worker, once from the sink (same verdict: :mod:`schemas.validation`);
- every malformed score is in dead-letter from the sidecar and from the sink;
- every valid window is stored by the sink, and every valid endpoint was scored;
- nothing is stored that the worker dead-lettered.

Kinds: random bytes, bit flips, truncation, bad magic, unknown schema ids, NaN / inf /
negative / huge values, empty values, null values, ~1 MB values, null keys, huge spans,
windows ending far in the future, windows ending before they start, scores computed in
the future. Whether a generated record is malformed is decided the way the worker decides
(decode, schema ranges, :func:`schemas.validation.telemetry_problem`): a bit flip that
still makes a valid window counts as valid (and must be stored).

    python benchmarks/faults.py            # 100,000 malformed records
    python benchmarks/faults.py --quick    # 5,000; what tests/test_bench_faults.py runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from benchmarks.support.kafka_read import read_to_end
from benchmarks.support.processes import kafka_env
from benchmarks.support.records import INTERVAL_MS, window
from schemas.codec import Codec, CodecError
from schemas.validation import reference_ms, score_problem, telemetry_problem
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import ensure_topics, topic_name

OUT = Path(__file__).resolve().parents[1] / "out" / "benchmarks" / "faults.json"
STEP = 300
TOKEN = "fault-suite-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- processes


@dataclass
class Stack:
    """A worker, a sink and a sidecar as real processes on one topic prefix."""

    kafka: KafkaSettings
    work: Path
    endpoints: list[str]
    worker_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    sink_port: int = 0
    sidecar_port: int = 0
    worker_metrics_port: int = 0
    app_id: str = ""
    worker_log_level: str = "warn"

    def env(self) -> dict[str, str]:
        return kafka_env(self.kafka)

    def start(self) -> Stack:
        self.work.mkdir(parents=True, exist_ok=True)
        self.app_id = f"faults-{uuid.uuid4().hex[:6]}"
        self.sink_port, self.sidecar_port = free_port(), free_port()
        self.worker_metrics_port = free_port()
        base = self.env()
        self._spawn("worker", ["worker", "--log-level", self.worker_log_level], {
            **base, "LOADCAST_PROCESSOR__APP_ID": self.app_id,
            "LOADCAST_PROCESSOR__STEP_SECONDS": str(STEP),
            "LOADCAST_PROCESSOR__SNAPSHOT_EVERY_SECONDS": "2",
            "LOADCAST_PROCESSOR__METRICS_PORT": str(self.worker_metrics_port),
            **self.worker_env})
        self._spawn("sink", ["sink"], {
            **base, "LOADCAST_SINK__DSN": f"chdb://{self.work}/ch",
            "LOADCAST_SINK__GROUP_ID": f"{self.app_id}-sink",
            "LOADCAST_SINK__BATCH_MAX_SECONDS": "0.5",
            "LOADCAST_SINK__ADMIN_PORT": str(self.sink_port),
            "LOADCAST_SINK__ADMIN_TOKEN": TOKEN})
        upstreams = [{"id": e, "url": f"http://127.0.0.1:{free_port()}", "api": "orders",
                      "region": "eu"} for e in self.endpoints]
        self._spawn("sidecar", ["sidecar", "--data-plane", "proxy"], {
            **base, "LOADCAST_SIDECAR__UPSTREAMS": json.dumps(upstreams),
            "LOADCAST_SIDECAR__REGION": "eu",
            "LOADCAST_SIDECAR__LISTEN_PORT": str(free_port()),
            "LOADCAST_SIDECAR__ADMIN_PORT": str(self.sidecar_port),
            "LOADCAST_SIDECAR__SCORE_LOOKBACK_S": "3600"})
        return self

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with (self.work / f"{name}.log").open("ab") as f:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "loadcast", *args], env=env, stdout=f,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if all(h.values()):
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited at start-up: {self.log_tail(dead[0])}")
            time.sleep(0.3)
        raise RuntimeError(f"not ready in {timeout:.0f}s: {self.health()}")

    def health(self) -> dict[str, bool]:
        """Each process: running and (sink, sidecar) /health answering 200."""
        out = {n: p.poll() is None for n, p in self.procs.items()}
        for name, port in (("sink", self.sink_port), ("sidecar", self.sidecar_port)):
            if out.get(name):
                out[name] = http_status(f"http://127.0.0.1:{port}/health") == 200
        if out.get("worker"):
            # Up, and every telemetry partition assigned and recovered: records that
            # arrive while a partition recovers can be dropped (a known worker bug: Faust
            # drops the re-fetch after the recovery seek once a stale record passed).
            try:
                out["worker"] = self.worker_metric(
                    "loadcast_processor_partitions") >= self.kafka.partitions
            except OSError:
                out["worker"] = False
        return out

    def sidecar(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sidecar_port}{path}",
                                    timeout=5) as r:
            return json.loads(r.read())

    def worker_metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.worker_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (not want or want in line):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def sql(self, query: str) -> list[list[Any]]:
        """Rows of a query the running sink answers (none before its first batch made
        the tables)."""
        from sinks.admin import fetch_query
        from sinks.errors import QueryError

        try:
            return fetch_query(f"http://127.0.0.1:{self.sink_port}", TOKEN,
                               {"sql": query}).rows
        except QueryError as e:
            if "UNKNOWN_TABLE" in str(e):
                return []
            raise

    def log_tail(self, name: str, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.work / f"{name}.log").read_text(errors="replace")[-n:]
        return ""

    def stop(self, timeout: float = 20.0) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
                codes[name] = None
        return codes

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


# --------------------------------------------------------------------------- records


def load_score(endpoint: str, computed_at: int, score: float = 0.5) -> dict[str, Any]:
    return {
        "endpoint_id": endpoint, "api": "orders", "region": "eu", "computed_at": computed_at,
        "valid_until": computed_at + 600_000, "score": score, "capacity_rps": 100.0,
        "capacity_source": "DEFAULT", "current_rps": 10.0, "predicted_utilization": 0.1,
        "latency_p99_ms": 50.0, "error_rate": 0.0, "anomaly_score": 0.0, "step_seconds": 60,
        "forecast": [], "model": "faults", "reasons": [],
    }


TELEMETRY_KINDS = (
    "random", "bitflip", "truncated", "bad_magic", "unknown_id", "nan", "inf", "negative",
    "huge", "empty", "null", "big", "null_key", "huge_span", "future", "reversed",
)


class Generator:
    """Malformed records of every kind; :meth:`verdict` says what the worker will do."""

    def __init__(self, codec: Codec, endpoints: list[str], base_ms: int, seed: int = 15,
                 big_bytes: int = 1_000_000 - 4096) -> None:
        self.codec = codec
        self.lax = Codec(codec.ids, validate_on_encode=False)
        self.endpoints = endpoints
        self.base_ms = base_ms
        self.rng = random.Random(seed)
        self.big_bytes = big_bytes
        self.counter = 0

    def _base(self) -> dict[str, Any]:
        self.counter += 1
        return window(self.rng.choice(self.endpoints), self.counter % 50, self.base_ms)

    def telemetry(self, kind: str) -> tuple[bytes | None, bytes | None]:
        """(key, value) of one record of ``kind``."""
        rng, w = self.rng, self._base()
        key: bytes | None = w["endpoint_id"].encode()
        good = self.codec.encode("EndpointTelemetry", w)
        if kind == "random":
            return key, rng.randbytes(rng.randint(1, 300))
        if kind == "bitflip":
            b = bytearray(good)
            for _ in range(rng.randint(1, 3)):  # in the numeric tail (after the strings)
                pos = rng.randrange(max(5, len(b) - 70), len(b))
                b[pos] ^= 1 << rng.randrange(8)
            return key, bytes(b)
        if kind == "truncated":
            return key, good[: rng.randrange(1, len(good) - 1)]
        if kind == "bad_magic":
            return key, bytes([rng.randrange(1, 256)]) + good[1:]
        if kind == "unknown_id":
            return key, b"\x00" + struct.pack(">I", rng.randrange(10_000, 2**31)) + good[5:]
        if kind == "nan":
            return key, self.lax.encode("EndpointTelemetry", {**w, "latency_p99_ms": math_nan()})
        if kind == "inf":
            return key, self.lax.encode("EndpointTelemetry", {**w, "cpu_percent": float("inf")})
        if kind == "negative":
            return key, self.lax.encode("EndpointTelemetry", {**w, "request_count": -5})
        if kind == "huge":
            return key, self.lax.encode("EndpointTelemetry", {**w, "memory_percent": 1e300})
        if kind == "empty":
            return key, b""
        if kind == "null":
            return key, None
        if kind == "big":
            return key, self.codec.encode("EndpointTelemetry", w)[:5] + rng.randbytes(
                self.big_bytes)
        if kind == "null_key":
            return None, self.lax.encode("EndpointTelemetry", {**w, "errors_4xx": -1})
        if kind == "huge_span":
            return key, self.codec.encode("EndpointTelemetry", {
                **w, "window_end": w["window_start"] + 795 * 86_400_000})
        if kind == "future":
            end = reference_ms() + 5 * 365 * 86_400_000
            return key, self.codec.encode("EndpointTelemetry", {
                **w, "window_start": end - INTERVAL_MS, "window_end": end})
        if kind == "reversed":
            return key, self.codec.encode("EndpointTelemetry", {
                **w, "window_end": w["window_start"] - 1})
        raise ValueError(kind)

    def bad_score(self) -> tuple[bytes | None, bytes]:
        """A malformed LoadScore: garbage, out of range, or computed years ahead."""
        rng = self.rng
        e = rng.choice(self.endpoints)
        k = rng.randrange(3)
        if self.counter % 1000 == 1:  # now and then ~1 MB
            return e.encode(), rng.randbytes(self.big_bytes)
        if k == 0:
            return e.encode(), rng.randbytes(rng.randint(1, 200))
        if k == 1:
            return e.encode(), self.lax.encode("LoadScore", {
                **load_score(e, reference_ms()), "score": 7.5})
        return e.encode(), self.codec.encode("LoadScore", load_score(
            e, reference_ms() + 3 * 365 * 86_400_000))

    def verdict(self, value: bytes | None) -> str | None:
        """The worker's reason for dead-lettering ``value`` (None: it is valid)."""
        if value is None:
            return "invalid"
        try:
            record = self.codec.decode(value, validate=False)
            name = self.codec.name_of(value)
        except CodecError as e:
            return e.reason
        if name != "loadcast.EndpointTelemetry":
            return "wrong_schema"
        try:
            self.codec.check("EndpointTelemetry", record)
        except CodecError:
            return "out_of_range"
        problem = telemetry_problem(record, reference_ms())
        return problem[0] if problem else None

    def score_verdict(self, value: bytes) -> str | None:
        try:
            record = self.codec.decode(value)
        except CodecError as e:
            return e.reason
        problem = score_problem(record, reference_ms())
        return problem[0] if problem else None


def math_nan() -> float:
    return float("nan")


def producer(kafka: KafkaSettings) -> Producer:
    conf = kafka.client_config()
    conf.update({"linger.ms": 20, "queue.buffering.max.messages": 200_000,
                 "message.max.bytes": 1_048_576, "enable.idempotence": True})
    return Producer(conf)


def read_all(kafka: KafkaSettings, short: str, timeout: float = 60.0,
             idle: float = 3.0) -> list[Message]:
    """Every record of a topic, from 0 to its end (stops after ``idle`` s with nothing)."""
    return read_to_end(kafka.consumer_config(None), topic_name(kafka, short),
                       timeout=timeout, idle=idle, batch=5000, poll_s=0.3)


def headers(m: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    raw: Any = m.headers() or []
    for k, v in raw:
        out[k] = v.decode(errors="replace") if isinstance(v, bytes) else str(v or "")
    return out


class DeadLetterReader:
    """Dead letters by consumer, read incrementally (one consumer kept open):
    {consumer: {(source topic, partition, offset): reason}}."""

    def __init__(self, kafka: KafkaSettings) -> None:
        topic = topic_name(kafka, "dead-letter")
        self.c = Consumer(kafka.consumer_config(None, **{"enable.partition.eof": True}))
        parts = list(self.c.list_topics(topic, timeout=10).topics[topic].partitions)
        self.c.assign([TopicPartition(topic, p, 0) for p in parts])
        self.parts = parts
        self.letters: dict[str, dict[tuple[str, int, int], str]] = {}

    def read(self, budget_s: float = 30.0) -> dict[str, dict[tuple[str, int, int], str]]:
        """Read what arrived since the last call (until every partition's end)."""
        open_parts = set(self.parts)
        deadline = time.monotonic() + budget_s
        while open_parts and time.monotonic() < deadline:
            for m in self.c.consume(10_000, 0.3):
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_parts.discard(m.partition())
                    continue
                h = headers(m)
                try:
                    where = (h["loadcast.source_topic"], int(h["loadcast.partition"]),
                             int(h["loadcast.offset"]))
                except (KeyError, ValueError):
                    continue
                who = h.get("loadcast.consumer", "?")
                self.letters.setdefault(who, {})[where] = h.get("loadcast.reason", "")
        return self.letters

    def close(self) -> None:
        self.c.close()


def consumer_of(letters: dict[str, dict[tuple[str, int, int], str]], prefix: str
                ) -> dict[tuple[str, int, int], str]:
    out: dict[tuple[str, int, int], str] = {}
    for who, d in letters.items():
        if who.startswith(prefix):
            out.update(d)
    return out


# --------------------------------------------------------------------------- the run


def run(kafka: KafkaSettings, work: Path, *, malformed: int, valid_every: int,
        bad_scores: int, max_big: int = 20, log: Any = print,
        worker_log_level: str = "warn") -> dict[str, Any]:
    codec = Codec.embedded()
    endpoints = ["e1", "e2", "e3", "e4"]
    # Valid windows march on from here, 60 s each per endpoint: stay in the past.
    span_h = (malformed // valid_every // len(endpoints) + 60) * INTERVAL_MS // 3_600_000
    base = (reference_ms() // 60_000) * 60_000 - (span_h + 2) * 3_600_000
    gen = Generator(codec, endpoints, base)
    telemetry, scores_topic = topic_name(kafka, "telemetry"), topic_name(kafka, "load-scores")
    expected: dict[tuple[int, int], str | None] = {}  # (partition, offset) -> verdict
    kinds: dict[tuple[int, int], str] = {}
    score_expected: dict[tuple[int, int], str | None] = {}
    polls: Counter[str] = Counter()
    unhealthy: Counter[str] = Counter()
    started = time.monotonic()
    with Stack(kafka, work, endpoints, worker_log_level=worker_log_level) as stack:
        stack.wait_ready(90)
        log(f"processes ready in {time.monotonic() - started:.1f}s")
        p = producer(kafka)

        def track(store: dict[tuple[int, int], Any], meta: Any,
                  kind_of: Any = None) -> Any:
            def cb(err: Any, msg: Message) -> None:
                if err is None:
                    store[(msg.partition() or 0, msg.offset() or 0)] = meta
                    if kind_of is not None:
                        kinds[(msg.partition() or 0, msg.offset() or 0)] = kind_of
                else:
                    log(f"produce failed: {err}")
            return cb

        step = 0
        n_valid = 0
        t_health = time.monotonic()
        bigs = 0
        for i in range(malformed):
            kind = TELEMETRY_KINDS[i % len(TELEMETRY_KINDS)]
            if kind == "big":  # ~1 MB each: a few make the point, thousands only load Tansu
                bigs += 1
                if bigs > max_big:
                    kind = "random"
            key, value = gen.telemetry(kind)
            verdict = gen.verdict(value)
            p.produce(telemetry, value=value, key=key,
                      on_delivery=track(expected, verdict, kind))
            if i % valid_every == 0:  # a valid window of a real endpoint, in order
                e = endpoints[step % len(endpoints)]
                w = window(e, step // len(endpoints), base)
                step += 1
                n_valid += 1
                p.produce(telemetry, value=codec.encode("EndpointTelemetry", w),
                          key=e.encode(), on_delivery=track(expected, None, "valid"))
            if bad_scores and i % max(1, malformed // bad_scores) == 0:
                key, value = gen.bad_score()
                p.produce(scores_topic, value=value, key=key,
                          on_delivery=track(score_expected, gen.score_verdict(value)))
            p.poll(0)
            if time.monotonic() - t_health > 1.0:
                t_health = time.monotonic()
                for name, ok in stack.health().items():
                    polls[name] += 1
                    if not ok:
                        unhealthy[name] += 1
        assert p.flush(60) == 0, "records not delivered"
        produced_s = time.monotonic() - started
        log(f"produced {len(expected)} telemetry records ({n_valid} valid windows) and "
            f"{len(score_expected)} scores in {produced_s:.1f}s")

        bad = {k for k, v in expected.items() if v is not None}
        good = {k for k, v in expected.items() if v is None}
        bad_score_keys = {k for k, v in score_expected.items() if v is not None}

        reader = DeadLetterReader(kafka)

        def settled() -> bool:
            letters = reader.read()
            w = consumer_of(letters, stack.app_id)
            s = consumer_of(letters, "loadcast-sink")
            sc = consumer_of(letters, "sidecar-")
            got_w = {(p_, o) for (t, p_, o) in w if t == telemetry}
            got_s = {(p_, o) for (t, p_, o) in s if t == telemetry}
            got_sc = {(p_, o) for (t, p_, o) in sc if t == scores_topic}
            log(f"dead letters: worker {len(got_w)}, sink {len(got_s)}, sidecar "
                f"{len(got_sc)} of {len(bad)} / {len(bad_score_keys)}")
            return bad <= got_w and bad <= got_s and bad_score_keys <= got_sc

        deadline = time.monotonic() + max(120.0, malformed / 50)
        while time.monotonic() < deadline and not settled():
            for name, ok in stack.health().items():
                polls[name] += 1
                if not ok:
                    unhealthy[name] += 1
            time.sleep(3)
        letters = reader.read()
        reader.close()
        w_dead = consumer_of(letters, stack.app_id)
        s_dead = consumer_of(letters, "loadcast-sink")
        sc_dead = consumer_of(letters, "sidecar-")
        stored: set[tuple[int, int]] = set()
        stored_deadline = time.monotonic() + 60
        while time.monotonic() < stored_deadline:
            rows = stack.sql("SELECT DISTINCT _partition, _offset FROM telemetry "
                             f"WHERE _topic = '{telemetry}'")
            stored = {(int(r[0]), int(r[1])) for r in rows}
            if good <= stored:
                break
            time.sleep(2)
        scored = {r[0] for r in stack.sql("SELECT DISTINCT endpoint_id FROM load_scores")}
        final_health = stack.health()
        for name, ok in final_health.items():
            polls[name] += 1
            if not ok:
                unhealthy[name] += 1
        stop_codes = stack.stop()

    w_bad = {(p_, o) for (t, p_, o) in w_dead if t == telemetry}
    s_bad = {(p_, o) for (t, p_, o) in s_dead if t == telemetry}
    by_kind: dict[str, dict[str, int]] = {}
    for k, kind in kinds.items():
        d = by_kind.setdefault(kind, {"records": 0, "malformed": 0, "worker_dlq": 0,
                                      "sink_dlq": 0, "stored": 0})
        d["records"] += 1
        d["malformed"] += expected[k] is not None
        d["worker_dlq"] += k in w_bad
        d["sink_dlq"] += k in s_bad
        d["stored"] += k in stored
    bad_scores_keys = {k for k, v in score_expected.items() if v is not None}
    sc_bad = {(p_, o) for (t, p_, o) in sc_dead if t == scores_topic}
    s_bad_scores = {(p_, o) for (t, p_, o) in s_dead if t == scores_topic}
    no_reason = sum(1 for d in (w_dead, s_dead, sc_dead) for r in d.values() if not r)
    return {
        "malformed_requested": malformed,
        "telemetry_records": len(expected),
        "malformed_telemetry": len(bad),
        "valid_telemetry": len(good),
        "valid_windows_interleaved": n_valid,
        "malformed_dead_lettered_by_worker": len(bad & w_bad),
        "malformed_dead_lettered_by_sink": len(bad & s_bad),
        "valid_dead_lettered_by_worker": len(good & w_bad),
        "valid_dead_lettered_by_sink": len(good & s_bad),
        "valid_stored": len(good & stored),
        "stored_but_rejected_by_worker": len(stored & w_bad),
        "malformed_scores": len(bad_scores_keys),
        "malformed_scores_dead_lettered_by_sidecar": len(bad_scores_keys & sc_bad),
        "malformed_scores_dead_lettered_by_sink": len(bad_scores_keys & s_bad_scores),
        "dead_letters_without_reason": no_reason,
        "endpoints_scored": sorted(e for e in scored if e in endpoints),
        "health_polls": dict(polls),
        "unhealthy_polls": dict(unhealthy),
        "final_health": final_health,
        "stop_exit_codes": stop_codes,
        "by_kind": by_kind,
        "seconds": round(time.monotonic() - started, 1),
    }


def check(r: dict[str, Any]) -> list[str]:
    """What the Done-when demands; the list of failures (empty: met)."""
    fails = []
    m = r["malformed_telemetry"]
    if r["malformed_dead_lettered_by_worker"] != m:
        fails.append(f"worker dead-lettered {r['malformed_dead_lettered_by_worker']} of {m}")
    if r["malformed_dead_lettered_by_sink"] != m:
        fails.append(f"sink dead-lettered {r['malformed_dead_lettered_by_sink']} of {m}")
    if r["valid_stored"] != r["valid_telemetry"]:
        fails.append(f"{r['valid_stored']} of {r['valid_telemetry']} valid windows stored")
    if r["stored_but_rejected_by_worker"]:
        fails.append(f"{r['stored_but_rejected_by_worker']} stored that the worker rejected")
    if r["malformed_scores_dead_lettered_by_sidecar"] != r["malformed_scores"]:
        fails.append("malformed scores missing from the sidecar's dead letters")
    if r["malformed_scores_dead_lettered_by_sink"] != r["malformed_scores"]:
        fails.append("malformed scores missing from the sink's dead letters")
    if r["dead_letters_without_reason"]:
        fails.append("dead letters without a reason")
    if len(r["endpoints_scored"]) != 4:
        fails.append(f"only {r['endpoints_scored']} scored")
    if any(r["unhealthy_polls"].values()) or not all(r["final_health"].values()):
        fails.append(f"unhealthy: {r['unhealthy_polls']} final {r['final_health']}")
    return fails


@contextlib.contextmanager
def broker_settings(bootstrap: str | None) -> Iterator[KafkaSettings]:
    if bootstrap:
        yield KafkaSettings(bootstrap_servers=bootstrap,
                            topic_prefix=f"faults{uuid.uuid4().hex[:6]}.", partitions=3)
        return
    from streams.kafka.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield KafkaSettings(bootstrap_servers=b.bootstrap,
                            topic_prefix=f"faults{uuid.uuid4().hex[:6]}.", partitions=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--malformed", type=int, default=100_000)
    ap.add_argument("--valid-every", type=int, default=10,
                    help="one valid window after every N malformed records")
    ap.add_argument("--bad-scores", type=int, default=2_500)
    ap.add_argument("--quick", action="store_true", help="5,000 malformed records")
    ap.add_argument("--bootstrap", help="an existing broker (default: an embedded one)")
    ap.add_argument("--work", type=Path, default=None, help="logs and chDB directory")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worker-log-level", default="warn")
    args = ap.parse_args()
    # SIGTERM ends the run through its finally blocks: the processes it started (each in
    # its own session) are stopped, not left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    max_big = 20
    if args.quick:
        args.malformed, args.bad_scores, max_big = 5_000, 200, 3
    import tempfile

    with broker_settings(args.bootstrap) as kafka, tempfile.TemporaryDirectory() as tmp:
        ensure_topics(kafka)
        work = args.work or Path(tmp)
        result = run(kafka, work, malformed=args.malformed, valid_every=args.valid_every,
                     bad_scores=args.bad_scores, max_big=max_big,
                     worker_log_level=args.worker_log_level)
    result["failures"] = check(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="malformed records through worker, sink and sidecar")
    for col in ("kind", "records", "malformed", "worker DLQ", "sink DLQ", "stored"):
        table.add_column(col, justify="right")
    for kind, d in sorted(result["by_kind"].items()):
        table.add_row(kind, *(str(d[c]) for c in ("records", "malformed", "worker_dlq",
                                                   "sink_dlq", "stored")))
    Console(width=120).print(table)
    for k, v in result.items():
        if k != "by_kind":
            print(f"{k}: {v}")
    print(f"wrote {args.out}")
    if result["failures"]:
        print("FAILED: " + "; ".join(result["failures"]))
        sys.exit(1)


if __name__ == "__main__":
    main()
