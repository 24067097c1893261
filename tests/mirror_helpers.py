"""Helpers of the mirroring tests: real `loadcast` processes (bundle server, executor,
planner, worker) on the test broker, commands, statuses. Every process started here is
stopped by the caller's ``finally`` / fixture; API processes an executor left behind are
killed from its state file."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from benchmarks.support.processes import kafka_env, stop_process
from schemas.codec import Codec
from streams.executor.supervise import kill_recorded
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import topic_name
from tests.kafka_helpers import read_topic

FIXTURE = Path(__file__).parent / "fixtures" / "bundles" / "echo-api"


@contextmanager
def app_in_thread(app: Any) -> Iterator[str]:
    """Serve an aiohttp ``app`` on a free loopback port in a thread; yields its URL and
    stops it (runner cleaned up) on exit."""
    import asyncio

    from streams.sidecar.proxy import serve

    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        runner, port = loop.run_until_complete(serve(app, "127.0.0.1", 0))
        state.update(url=f"http://127.0.0.1:{port}", loop=loop)
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10), "the server did not start in 10 s"
    try:
        yield str(state["url"])
    finally:
        state["loop"].call_soon_threadsafe(state["loop"].stop)
        t.join(10)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of ``proc`` within ``timeout`` (AssertionError otherwise)."""
    q: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: q.put(out.readline()), daemon=True).start()
    try:
        return q.get(timeout=timeout).strip()
    except queue.Empty:
        raise AssertionError(f"no output from {proc.args!r} within {timeout}s") from None


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
         timeout: float = 20) -> None:
    stop_process(proc, timeout, sig=sig, kill_wait_s=10, close_pipes=False)


@contextmanager
def bundle_server(store: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`loadcast bundle serve` on a free port; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadcast", "bundle", "serve", "--store", str(store),
         "--port", "0", "--duration", "600"],
        env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        url = read_line(proc, 30)
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        stop(proc)


def push_fixture(store: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "loadcast", "bundle", "push", str(FIXTURE),
                        "--store", str(store)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def start_executor(kafka: KafkaSettings, *, region: str, work_dir: Path, store_url: str,
                   public_key: str, log: Path, drain: float = 0.5,
                   key_id: str = "k1") -> subprocess.Popen[str]:
    """`loadcast executor`; returns once it says it is ready."""
    env = kafka_env(kafka, LOADCAST_MIRROR__TRUSTED_KEYS=f'{{"{key_id}": "{public_key}"}}',
                   LOADCAST_MIRROR__DRAIN_SECONDS=str(drain),
                   LOADCAST_MIRROR__EXECUTOR_ID=f"ex-{region}")
    with log.open("a") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadcast", "--log-level", "INFO", "executor",
             "--region", region, "--work-dir", str(work_dir), "--store-url", store_url],
            env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    try:
        line = read_line(proc, 60)
    except AssertionError:
        stop(proc)
        raise AssertionError(f"executor did not start: {log.read_text()[-2000:]}") from None
    assert line == "ready", f"{line!r}: {log.read_text()[-2000:]}"
    return proc


def cleanup_instances(work_dir: Path) -> None:
    kill_recorded(work_dir)


def command(signer: Any, *, action: str = "ACTIVATE", api: str = "echo-api",
            region: str = "edge-1", digest: str, instances: int = 1, sequence: int = 1,
            ttl_ms: int = 120_000, issued_at: int | None = None,
            sign: bool = True) -> dict[str, Any]:
    now = issued_at if issued_at is not None else int(time.time() * 1000)
    rec: dict[str, Any] = {
        "command_id": f"{api}/{region}/{sequence}-{uuid.uuid4().hex[:6]}", "action": action,
        "api": api, "region": region, "bundle_digest": digest,
        "desired_instances": instances, "sequence": sequence, "issued_at": now,
        "expires_at": now + ttl_ms, "reason": "test", "central_capacity_rps": 100.0,
        "forecast": [], "key_id": signer.key_id, "signature": b"",
    }
    return signer.sign(rec) if sign else rec


def produce(kafka: KafkaSettings, codec: Codec, records: list[dict[str, Any]],
            raw: list[bytes] = (), region: str = "edge-1") -> None:  # type: ignore[assignment]
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0})
    topic = topic_name(kafka, "mirror-commands")
    for v in raw:
        p.produce(topic, v, region.encode())
    for r in records:
        p.produce(topic, codec.encode("MirrorCommand", r), str(r["region"]).encode())
    assert p.flush(10) == 0


def statuses(kafka: KafkaSettings, codec: Codec) -> list[dict[str, Any]]:
    msgs = read_topic(kafka.bootstrap_servers, topic_name(kafka, "mirror-status"), 10)
    out = [codec.decode(m.value() or b"", "MirrorStatus") for m in msgs]
    return sorted(out, key=lambda r: r["at"])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def processes_in(directory: Path) -> list[int]:
    """Pids of live processes whose working directory is ``directory`` (API instances)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cwd", "status"]):
        if p.info.get("cwd") == str(directory) and p.info.get("status") != psutil.STATUS_ZOMBIE:
            out.append(p.pid)
    return out
